"""`edgeprune generate` on the tiny preset."""
from __future__ import annotations

import pytest
from PIL import Image
from skimage import data

from edgeprune.cli import main


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path


def test_generate_prints_answer_and_token_count(image, capsys):
    rc = main(["generate", "--model", "tiny-llava", "--image", str(image), "--prompt", "What is this?",
               "--method", "attention", "--keep", "16", "--positions", "original", "--max-new-tokens", "4"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[-1] == "image tokens: 16 of 576 (method: attention, positions: original)"


def test_generate_without_keep_does_not_prune(image, capsys):
    rc = main(["generate", "--model", "tiny-llava", "--image", str(image), "--image", str(image),
               "--prompt", "hi", "--max-new-tokens", "2", "--sample", "--top-p", "0.9"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(f"[{image}]") == 2
    assert "image tokens: 576 of 576 (method: none, positions: compact)" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--keep", "700"], "keep=700, expected 1 <= keep <= N=576"),
])
def test_generate_errors(image, capsys, argv, message):
    base = {"--model": "tiny-llava", "--image": str(image), "--prompt": "hi", "--method": "attention"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    rc = main(["generate", *[x for kv in base.items() for x in kv]])
    assert rc == 1 and message in capsys.readouterr().err


def test_generate_refuses_a_nonsense_count_as_a_usage_error(image, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "tiny-llava", "--image", str(image), "--prompt", "hi", "--max-new-tokens", "0"])
    assert exit_.value.code == 2 and "argument --max-new-tokens: 0: expected an integer >= 1" in capsys.readouterr().err


def test_generate_missing_image(tmp_path, capsys):
    rc = main(["generate", "--model", "tiny-llava", "--image", str(tmp_path / "none.png"), "--prompt", "hi"])
    assert rc == 1 and "no such file" in capsys.readouterr().err
