"""A run's environment.json names the CPU and the instruction set torch uses: a CPU fit repeats
exactly on one machine but not across instruction sets, so a refit that differs can be traced."""

import platform

import torch

from prn import runs

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme avx2 avx512f

processor\t: 1
model name\t: another block, not read
"""


def test_cpu_name_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert runs.cpu_name(info) == "AMD EPYC 9B14 (family 25)"
    info.write_text("processor\t: 0\nmodel name\t: Some ARM core\n")  # no family line on some CPUs
    assert runs.cpu_name(info) == "Some ARM core"


def test_cpu_name_without_cpuinfo(tmp_path):
    assert runs.cpu_name(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_environment_records_the_cpu():
    env = runs.environment()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
