"""The one Prometheus text reader (prometheus_client's parser underneath)."""

from __future__ import annotations

import pytest

from tokenfleet.observability import promtext

TEXT = """# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# HELP tokenfleet_gateway_requests_total Requests.
# TYPE tokenfleet_gateway_requests_total counter
tokenfleet_gateway_requests_total{code="2xx",tenant="a"} 5.0
tokenfleet_gateway_requests_total{code="5xx",tenant="a"} 1.0
tokenfleet_gateway_requests_total{tenant="b",code="2xx"} 2.0
tokenfleet_gateway_requests_created{code="2xx",tenant="a"} 1.7e9
# HELP w Wait.
# TYPE w histogram
w_bucket{le="1.0",slo_class="batch"} 1.0
w_bucket{le="+Inf",slo_class="batch"} 2.0
w_sum{slo_class="batch"} 3.5
w_count{slo_class="batch"} 2.0
"""


def test_value_sums_the_samples_that_match() -> None:
    assert promtext.value(TEXT, "vllm:num_requests_running") == 4.0
    assert promtext.value(TEXT, "tokenfleet_gateway_requests_total", tenant="a") == 6.0
    assert promtext.value(TEXT, "tokenfleet_gateway_requests_total", code="2xx") == 7.0
    assert promtext.value(TEXT, "no_such_series") == 0.0


def test_flat_keys_are_stable_whatever_the_label_order() -> None:
    flat = promtext.flat(TEXT)
    assert flat['tokenfleet_gateway_requests_total{code="2xx",tenant="b"}'] == 2.0
    assert flat['w_bucket{le="+Inf",slo_class="batch"}'] == 2.0
    assert not any("_created" in key for key in flat)


def test_summed_drops_buckets_and_other_prefixes() -> None:
    assert promtext.summed(TEXT, ("vllm:", "w")) == {
        "vllm:num_requests_running": 4.0,
        "w_sum": 3.5,
        "w_count": 2.0,
    }


def test_by_label() -> None:
    assert promtext.by_label(TEXT, "tokenfleet_gateway_requests_total", "tenant", code="2xx") == {
        "a": 5.0,
        "b": 2.0,
    }


def test_malformed_text_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="NaNx"):
        promtext.flat("x 1.0\ny NaNx\n")


def test_series_scan_reads_named_sample_lines_only() -> None:
    text = (
        TEXT
        + 'vllm:num_requests_running_x{engine="0"} 100.0\n'  # a longer name: not the series
        + "# HELP vllm:num_requests_waiting Waiting 7\n"
        + 'vllm:num_requests_waiting{model_name="a b"} 2.5 1700000000\n'  # value, then a timestamp
    )
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "absent")
    assert promtext.series_sums(text, names) == {
        "vllm:num_requests_running": 4.0,
        "vllm:num_requests_waiting": 2.5,
        "absent": 0.0,
    }
    requests = list(promtext.series_samples(text, ("tokenfleet_gateway_requests_total",)))
    assert ("tokenfleet_gateway_requests_total", {"tenant": "b", "code": "2xx"}, 2.0) in requests
    assert len(requests) == 3
    # The scan agrees with prometheus_client's parser on well-formed text.
    assert promtext.series_sums(TEXT, ["w_sum"]) == {"w_sum": promtext.value(TEXT, "w_sum")}
