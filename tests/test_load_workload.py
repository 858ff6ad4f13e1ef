"""Workload files: strict validation with field paths, length distributions, datasets, mixes, seeds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tokenfleet.load import shapes
from tokenfleet.load.traffic import (
    RequestFactory,
    estimate_tokens,
    load_sharegpt,
    mix_weights,
    offered_level,
    rate_factor,
    sample_length,
    tenant_active,
)
from tokenfleet.load.workload import (
    ClassMix,
    Fixed,
    LogNormal,
    TenantMix,
    Uniform,
    Workload,
    WorkloadError,
    load_workload,
    parse_workload,
    shape_of,
)
from tokenfleet.spec import load_service

WORKLOADS = Path(__file__).resolve().parent.parent / "load" / "workloads"


@pytest.mark.parametrize("path", sorted(WORKLOADS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workloads_are_valid_and_generate(path: Path) -> None:
    workload = load_workload(path)
    factory = RequestFactory(workload)
    for _ in range(5):
        request = factory.next(0.0)
        assert request.prompt
        assert request.max_tokens >= 1


def errors_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(WorkloadError) as info:
        parse_workload(data, "w.yaml")
    assert "w.yaml" in str(info.value)
    return info.value.errors


def test_unknown_field_reports_its_path() -> None:
    errors = errors_of({"arrival": {"shape": {"kind": "constant", "value": 1, "rte": 2}}})
    assert any(path.endswith("shape.constant.rte") for path, _ in errors), errors


def test_bad_values_report_paths_and_reasons() -> None:
    errors = errors_of(
        {
            "outputTokens": {"dist": "uniform", "min": 10, "max": 5},
            "arrival": {"shape": {"kind": "step", "steps": [{"value": 1, "durationS": -3}]}},
            "classes": [{"name": "a", "share": 0}],
        }
    )
    paths = [p for p, _ in errors]
    assert any("outputTokens.uniform" in p for p in paths), paths
    assert "arrival.shape.step.steps[0].durationS" in paths
    assert "classes[0].share" in paths
    assert any("must not exceed" in reason for _, reason in errors)


def test_wrong_discriminator_and_cross_field_rules() -> None:
    errors = errors_of({"prompts": {"kind": "nope"}})
    assert errors[0][0] == "prompts"
    errors = errors_of({"arrival": {"mode": "closed", "shape": {"kind": "sweep", "rates": [1], "stepS": 1}}})
    assert "mode: open" in errors[0][1]
    errors = errors_of({"classes": [{"name": "a"}, {"name": "a"}]})
    assert "unique" in errors[0][1]
    assert errors_of([1, 2])[0] == ("<root>", "a workload must be a mapping")


def test_load_workload_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(WorkloadError, match="<yaml>"):
        load_workload(bad)
    nodata = tmp_path / "nodata.yaml"
    nodata.write_text("prompts: {kind: sharegpt, path: none.json}\n")
    with pytest.raises(WorkloadError, match=r"prompts\.path"):
        load_workload(nodata)


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    assert sample_length(rng, Fixed(dist="fixed", value=7)) == 7
    uniform = [sample_length(rng, Uniform(dist="uniform", min=3, max=6)) for _ in range(2000)]
    assert set(uniform) == {3, 4, 5, 6}
    lognormal = LogNormal(dist="lognormal", median=50, sigma=0.5, min=5, max=400)
    values = np.asarray([sample_length(rng, lognormal) for _ in range(5000)])
    assert np.median(values) == pytest.approx(50, rel=0.05)
    assert np.std(np.log(values)) == pytest.approx(0.5, rel=0.07)
    assert values.min() >= 5
    assert values.max() <= 400


def test_sharegpt_import(tmp_path: Path) -> None:
    pairs = load_sharegpt(WORKLOADS / "data" / "sharegpt-sample.json", max_input_tokens=1000)
    prompts = [p for p, _ in pairs]
    assert "How do I reverse a list in Python?" in prompts
    assert "Name a sorting algorithm." in prompts  # system turn first is skipped
    assert "unanswered" not in prompts
    assert dict(pairs)["Name a sorting algorithm."] == estimate_tokens("Merge sort.")
    assert len(load_sharegpt(WORKLOADS / "data" / "sharegpt-sample.json", 1000, limit=2)) == 2
    assert all(
        estimate_tokens(p) <= 5 for p, _ in load_sharegpt(WORKLOADS / "data" / "sharegpt-sample.json", 5)
    )
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(ValueError, match="no usable"):
        load_sharegpt(empty, 100)
    empty.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(empty, 100)


def test_shared_prefix_generator_has_n_prefixes_times_m_suffixes() -> None:
    workload = parse_workload(
        {
            "prompts": {
                "kind": "sharedPrefix",
                "numPrefixes": 3,
                "prefixTokens": 20,
                "suffixesPerPrefix": 4,
                "suffixTokens": 5,
            }
        }
    )
    factory = RequestFactory(workload)
    prompts = [str(factory.next().prompt) for _ in range(600)]
    prefixes = {" ".join(p.split()[:20]) for p in prompts}
    assert len(prefixes) == 3
    assert len(set(prompts)) == 12
    assert all(len(p.split()) == 25 for p in prompts)
    # Other workers share the same prefixes.
    other_worker = RequestFactory(workload, worker=1)
    other = {" ".join(str(other_worker.next().prompt).split()[:20]) for _ in range(50)}
    assert other <= prefixes


def test_class_and_tenant_mix_and_seed() -> None:
    data = {
        "seed": 5,
        "classes": [
            {"name": "interactive", "share": 3, "priority": 0, "ttftMs": 500},
            {"name": "batch", "share": 1, "priority": 2},
        ],
        "tenants": [{"name": "a", "share": 1}, {"name": "b", "share": 1, "burst": {"onS": 1, "offS": 3}}],
    }
    workload = parse_workload(data)
    factory = RequestFactory(workload)
    requests = [factory.next(t=0.5) for _ in range(4000)]
    classes = Counter(r.cls for r in requests)
    assert classes["interactive"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert {r.priority for r in requests if r.cls == "batch"} == {2}
    tenants = Counter(r.tenant for r in requests)
    assert tenants["b"] / 4000 == pytest.approx(0.5, abs=0.03)
    # During b's off phase only a sends.
    assert {factory.next(t=2.0).tenant for _ in range(200)} == {"a"}
    assert tenant_active(TenantMix(name="x"), 123.0)
    # Same seed, same requests; another seed or worker differs.
    again = [RequestFactory(workload).next(t=0.5) for _ in range(1)]
    assert again[0] == requests[0]
    assert RequestFactory(parse_workload({**data, "seed": 6})).next(0.5).prompt != requests[0].prompt
    assert RequestFactory(workload, worker=1).next(0.5).prompt != requests[0].prompt
    assert workload.class_named("batch") is not None
    assert workload.class_named("nope") is None


def test_shape_of_every_kind() -> None:
    cases = {
        "constant": ({"kind": "constant", "value": 2}, shapes.Constant),
        "step": ({"kind": "step", "steps": [{"value": 1, "durationS": 2}]}, shapes.Steps),
        "ramp": ({"kind": "ramp", "start": 1, "end": 2, "durationS": 2}, shapes.Ramp),
        "burst": ({"kind": "burst", "low": 1, "high": 2, "onS": 1, "offS": 1}, shapes.Burst),
        "diurnal": ({"kind": "diurnal", "mean": 1, "amplitude": 1, "periodS": 10}, shapes.Diurnal),
        "sweep": ({"kind": "sweep", "rates": [1, 2], "stepS": 5}, shapes.Sweep),
    }
    for spec, kind in cases.values():
        shape = shape_of(parse_workload({"arrival": {"shape": spec}}))
        assert isinstance(shape, kind)
        assert shape.level(0.5) is not None


def test_classes_from_a_service_spec(tmp_path: Path) -> None:
    service = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"
    workload_path = tmp_path / "w.yaml"
    workload_path.write_text(f"classesFrom: {service}\nclasses: [{{name: interactive, share: 3}}]\n")
    workload = load_workload(workload_path)
    by_name = {c.name: c for c in workload.classes}
    spec_classes = load_service(service).spec.scheduler.classes
    assert list(by_name) == [c.name for c in spec_classes]
    for spec_class in spec_classes:
        mix = by_name[spec_class.name]
        assert (mix.priority, mix.ttft_ms, mix.tpot_ms) == (
            spec_class.priority,
            spec_class.ttft_ms,
            spec_class.tpot_ms,
        )
    assert by_name["interactive"].share == 3
    assert by_name["batch"].share == 1
    (tmp_path / "bad.yaml").write_text("kind: LLMService\n")
    workload_path.write_text("classesFrom: bad.yaml\n")
    with pytest.raises(WorkloadError, match="classesFrom"):
        load_workload(workload_path)
    workload_path.write_text("classesFrom: missing.yaml\n")
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload(workload_path)


def test_per_class_lengths_are_drawn_per_class() -> None:
    workload = parse_workload(
        {
            "prompts": {"kind": "tokenIds", "inputTokens": {"dist": "fixed", "value": 7}},
            "outputTokens": {"dist": "fixed", "value": 5},
            "classes": [
                {"name": "short", "inputTokens": {"dist": "uniform", "min": 2, "max": 4}},
                {"name": "long", "outputTokens": {"dist": "uniform", "min": 90, "max": 99}},
                {"name": "plain"},
            ],
        }
    )
    factory = RequestFactory(workload)
    requests = [factory.next() for _ in range(600)]
    by_class = {name: [r for r in requests if r.cls == name] for name in ("short", "long", "plain")}
    assert all(len(by_class[n]) > 100 for n in by_class)
    # Token-id prompts are exactly as long as drawn, ids inside the default range.
    assert {len(r.prompt) for r in by_class["short"]} == {2, 3, 4}
    assert {len(r.prompt) for r in by_class["long"] + by_class["plain"]} == {7}
    assert all(isinstance(i, int) and 100 <= i <= 999 for r in requests for i in r.prompt)
    assert {r.max_tokens for r in by_class["short"] + by_class["plain"]} == {5}
    assert {r.max_tokens for r in by_class["long"]} <= set(range(90, 100))
    assert len({r.max_tokens for r in by_class["long"]}) > 5


def test_class_output_lengths_come_before_a_datasets() -> None:
    workload = parse_workload(
        {
            "prompts": {"kind": "sharegpt", "path": str(WORKLOADS / "data" / "sharegpt-sample.json")},
            "classes": [{"name": "a", "outputTokens": {"dist": "fixed", "value": 3}}],
        }
    )
    assert {RequestFactory(workload).next().max_tokens for _ in range(20)} == {3}


def test_mix_rules_name_the_field() -> None:
    def first(data: dict[str, object]) -> tuple[str, str]:
        return errors_of(data)[0]

    path, reason = first({"tenants": [{"name": "a", "classes": ["nope"]}]})
    assert (path, reason) == ("tenants[0].classes", "unknown class 'nope'; known: standard")
    path, reason = first(
        {"classes": [{"name": "x"}, {"name": "y"}], "tenants": [{"name": "a", "classes": ["x"]}]}
    )
    assert path == "classes[1]"
    assert "no tenant sends class 'y'" in reason
    path, reason = first(
        {
            "prompts": {"kind": "sharegpt", "path": "d.json"},
            "classes": [{"name": "x", "inputTokens": {"dist": "fixed", "value": 3}}],
        }
    )
    assert path == "classes[0].inputTokens"
    assert "not sharegpt" in reason
    path, reason = first(
        {"api": "chat", "prompts": {"kind": "tokenIds", "inputTokens": {"dist": "fixed", "value": 3}}}
    )
    assert path == "prompts"
    assert "api: completions" in reason
    ids = {"kind": "tokenIds", "inputTokens": {"dist": "fixed", "value": 3}, "minId": 9, "maxId": 2}
    path, reason = first({"prompts": ids})
    assert path == "prompts.tokenIds"
    assert "minId (9) must not exceed maxId (2)" in reason
    path, _ = first({"tenants": [{"name": "a", "burst": {"onS": 1, "offS": 1, "mode": "sometimes"}}]})
    assert path == "tenants[0].burst.mode"
    path, _ = first({"classes": [{"name": "x", "outputTokens": {"dist": "fixed", "value": 0}}]})
    assert path == "classes[0].outputTokens.fixed.value"
    # Built in code, the same rules hold (as one message naming the field).
    with pytest.raises(ValidationError, match=r"tenants\[0\]\.classes: unknown class 'b'"):
        Workload(classes=[ClassMix(name="a")], tenants=[TenantMix(name="t", classes=["b"])])


def test_tenant_restricted_to_classes_never_sends_others() -> None:
    workload = parse_workload(
        {
            "classes": [{"name": "interactive"}, {"name": "batch"}],
            "tenants": [{"name": "noisy", "share": 3, "classes": ["batch"]}, {"name": "quiet"}],
        }
    )
    factory = RequestFactory(workload)
    pairs = Counter((r.cls, r.tenant) for r in (factory.next() for _ in range(4000)))
    assert pairs[("interactive", "noisy")] == 0
    assert pairs[("interactive", "quiet")] / 4000 == pytest.approx(0.5, abs=0.03)
    # In batch, noisy and quiet split by share (3 : 1).
    assert pairs[("batch", "noisy")] / 4000 == pytest.approx(0.375, abs=0.03)


def test_add_mode_burst_adds_load_and_keeps_the_mean_share() -> None:
    workload = parse_workload(
        {
            "tenants": [
                {"name": "noisy", "share": 0.4, "burst": {"onS": 10, "offS": 30, "mode": "add"}},
                {"name": "steady", "share": 0.6},
            ]
        }
    )
    (_, on), (_, off) = mix_weights(workload, 5.0)[0], mix_weights(workload, 25.0)[0]
    assert on == pytest.approx([0.4 * 4, 0.6])  # all of its mean share within a quarter of the time
    assert off == pytest.approx([0.0, 0.6])  # the steady tenant's rate does not change
    assert rate_factor(workload, 5.0) == pytest.approx(2.2)
    assert rate_factor(workload, 25.0) == pytest.approx(0.6)
    mean = sum(rate_factor(workload, t + 0.5) for t in range(40)) / 40
    assert mean == pytest.approx(1.0)  # the shape's level stays the mean rate
    level = offered_level(workload.model_copy(update={"arrival": parse_workload({}).arrival}))
    assert level(5.0) == pytest.approx(2.2)  # × the default constant shape, 1 req/s
    closed = parse_workload({**workload.model_dump(by_alias=True), "arrival": {"mode": "closed"}})
    assert offered_level(closed)(5.0) == 1.0  # users, not a rate: bursts pick tenants only
    # `shift` (the default) keeps the rate and moves the share while the tenant is off.
    shifted = parse_workload({"tenants": [{"name": "a", "burst": {"onS": 1, "offS": 1}}, {"name": "b"}]})
    assert rate_factor(shifted, 0.5) == rate_factor(shifted, 1.5) == pytest.approx(1.0)
    assert mix_weights(shifted, 1.5)[0][1] == pytest.approx([0.0, 1.0])


def test_classes_from_a_service_keep_the_workloads_lengths(tmp_path: Path) -> None:
    service = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"
    workload_path = tmp_path / "w.yaml"
    workload_path.write_text(
        f"classesFrom: {service}\n"
        "classes: [{name: batch, share: 2, outputTokens: {dist: fixed, value: 99}}]\n"
        "tenants: [{name: a, classes: [interactive]}, {name: b, classes: [standard, batch]}]\n"
    )
    workload = load_workload(workload_path)
    batch = workload.class_named("batch")
    assert batch is not None
    assert (batch.share, batch.output_tokens) == (2, Fixed(dist="fixed", value=99))
    workload_path.write_text(f"classesFrom: {service}\ntenants: [{{name: a, classes: [interactive]}}]\n")
    with pytest.raises(WorkloadError, match=r"classes\[1\]: no tenant sends class"):
        load_workload(workload_path)
