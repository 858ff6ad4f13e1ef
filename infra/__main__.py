"""Pulumi's entry point (`main: infra/` in Pulumi.yaml): validate the stack config, build the stack."""

from tokenfleet.infra.program import program
from tokenfleet.infra.stackconfig import load_stack_config

program(*load_stack_config())
