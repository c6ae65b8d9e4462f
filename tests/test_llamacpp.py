"""`llamacpp.crash_reason`: the bench asks a child process whether llama.cpp runs before loading it in its own,
so a build that dies on this CPU costs the llama.cpp row, not the report. The probes here stand in for llama.cpp."""

import sys

import pytest

from cookbook import llamacpp


def test_a_probe_that_runs_gives_no_reason(tmp_path):
    assert llamacpp.crash_reason(tmp_path / "x.gguf", probe="import sys; assert sys.argv[1].endswith('x.gguf')") is None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_illegal_instruction_names_the_signal_and_the_rebuild(tmp_path):
    probe = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    why = llamacpp.crash_reason(tmp_path / "x.gguf", probe=probe)
    assert "SIGILL" in why and "illegal instruction" in why and "CMAKE_ARGS" in why, why


def test_a_failing_probe_gives_its_last_error_line(tmp_path):
    why = llamacpp.crash_reason(tmp_path / "x.gguf", probe="raise ValueError('no such file')")
    assert "exit 1" in why and "ValueError: no such file" in why, why


def test_a_hung_probe_is_a_reason_not_an_exception(tmp_path):
    why = llamacpp.crash_reason(tmp_path / "x.gguf", probe="import time; time.sleep(30)", timeout_s=1)
    assert "did not finish" in why and "1 s" in why, why
