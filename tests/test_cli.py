"""The bagel-serve command line: outputs, exit codes and messages for bad input."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from services.cli import main


def test_checkpoint_init_and_inspect(tmp_path, capsys):
    assert main(["checkpoint", "init", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(tmp_path / "ck")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["llm"]["hidden_size"] == 64 and info["ae"]["ch_mult"] == [1, 1, 2, 2]


def test_generate_writes_the_requested_size(tiny_ckpt_dir, tmp_path, capsys):
    out = tmp_path / "g.png"
    rc = main(["run", "generate", "--checkpoint", str(tiny_ckpt_dir), "--prompt", "a cat", "--size", "64x32",
               "--steps", "3", "--seed", "5", "--out", str(out)])
    assert rc == 0
    assert Image.open(out).size == (64, 32)
    assert json.loads(capsys.readouterr().out)["seed"] == 5


def test_understand_prints_an_answer(tiny_ckpt_dir, tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(img)
    rc = main(["run", "understand", "--checkpoint", str(tiny_ckpt_dir), "--image", str(img), "--prompt", "what?",
               "--max-new-tokens", "3"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 3


def test_bad_inputs_exit_2_with_a_message(tiny_ckpt_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    cases = [
        (["run", "understand", "--image", str(bad), "--prompt", "x"], "cannot"),
        (["run", "generate", "--prompt", "x", "--size", "1000x1000", "--out", str(tmp_path / "o.png")], "multiple of 16"),
        (["run", "generate", "--prompt", "x", "--size", "1040x1024", "--out", str(tmp_path / "o.png")], "up to 1024"),
        (["run", "generate", "--prompt", "x", "--size", "64x64", "--steps", "-2", "--out", str(tmp_path / "o.png")],
         "num_timesteps"),
        (["run", "edit", "--image", str(tmp_path / "missing.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")],
         "missing.png"),
    ]
    for argv, message in cases:
        argv = argv[:2] + ["--checkpoint", str(tiny_ckpt_dir)] + argv[2:]
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_the_cli_offers_the_registrys_attention_backends():
    from services.attention import backend_names
    from services.cli import ATTENTION_BACKENDS

    assert tuple(ATTENTION_BACKENDS) == tuple(backend_names())
