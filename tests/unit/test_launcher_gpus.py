"""`tandem serve --prefill-gpus / --decode-gpus` (engine/launcher.py): each tier worker sees the
GPU it was given as its only CUDA device, round-robin over the list; bad lists are refused at
once with a usage error."""

from __future__ import annotations

import sys

import pytest

from engine.cli import main
from engine.launcher import _Child, _tier_env, parse_gpu_list


def test_gpu_lists_parse_and_workers_take_them_in_turn():
    assert parse_gpu_list(None, "--decode-gpus") == []
    gpus = parse_gpu_list("1, 2,3", "--decode-gpus")
    assert gpus == ["1", "2", "3"]
    assert [_tier_env(gpus, i)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["1", "2", "3", "1", "2"]
    assert _tier_env([], 0) is None  # inherit this process's environment


@pytest.mark.parametrize("value", ["", "a", "0,,1", "-1", "0;1"])
def test_a_bad_gpu_list_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--decode-gpus", value])
    assert exc.value.code == 2
    assert "--decode-gpus wants comma-separated GPU indices" in capsys.readouterr().err


def test_a_worker_process_sees_only_its_gpu(tmp_path):
    out = tmp_path / "env.txt"
    child = _Child("decode-0", [sys.executable, "-c",
                                "import os, sys; open(sys.argv[1], 'w').write("
                                "os.environ['CUDA_VISIBLE_DEVICES'])", str(out)],
                   _tier_env(["0", "1"], 1))
    child.start()
    assert child.proc.wait(timeout=30) == 0
    assert out.read_text() == "1"
