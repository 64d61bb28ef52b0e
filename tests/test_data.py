import json

import pytest
import torch

from calibrate import data
from qtensor.errors import QtoolError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from calibrate.tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_split_is_last_20480_tokens_and_disjoint(tok):
    ids = data.tokenize(tok, [data.pydoc_text()])
    s = data.split(tok, None)
    assert len(s.eval) == 40 * 512
    assert torch.equal(s.eval, ids[-40 * 512 :])
    assert torch.equal(torch.cat([s.calib, s.eval]), ids)


def test_eval_windows_have_bos_and_cover_the_split(tok):
    wins = data.eval_windows(tok, None)
    assert len(wins) == 40
    assert all(w[0].item() == tok.bos_token_id and len(w) == 513 for w in wins)
    assert torch.equal(torch.cat([w[1:] for w in wins]), data.split(tok, None).eval)


def test_calibration_is_deterministic_and_from_calib_split(tok):
    a = data.calibration_samples(tok, None, 8, 64, seed=0)
    b = data.calibration_samples(tok, None, 8, 64, seed=0)
    c = data.calibration_samples(tok, None, 8, 64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 65) and (a[:, 0] == tok.bos_token_id).all()
    calib = data.split(tok, None).calib.tolist()
    text = " ".join(map(str, calib))
    for row in a:  # every sample is a contiguous slice of the calibration split
        assert " ".join(map(str, row[1:].tolist())) in text


def test_file_formats(tok, tmp_path):
    text = data.pydoc_text()[:20000]
    (tmp_path / "a.txt").write_text(text)
    with open(tmp_path / "a.jsonl", "w") as f:
        for para in text.split("\n\n"):
            f.write(json.dumps({"content": para}) + "\n")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": text.split("\n\n")}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": text.split("\n\n")}).save_to_disk(str(tmp_path / "ds"))
    ids_txt = data.tokenize(tok, data.read_texts(str(tmp_path / "a.txt")))
    for spec, field in ((tmp_path / "a.jsonl", "content"), (tmp_path / "a.parquet", "text"), (tmp_path / "ds", "text")):
        texts = data.read_texts(str(spec), field)
        # paragraphs re-joined with blank lines give back the same token ids
        assert torch.equal(data.tokenize(tok, texts), ids_txt), spec
    s = data.calibration_samples(tok, str(tmp_path / "a.parquet"), 4, 32, seed=3)
    assert torch.equal(s, data.calibration_samples(tok, str(tmp_path / "a.parquet"), 4, 32, seed=3))


@pytest.mark.parametrize(
    "name,content,msg",
    [
        ("empty.txt", b"", "holds no text"),
        ("bin.txt", b"\xff\xfe\x00\x81" * 10, "binary data"),
        ("latin1.txt", b"caf\xe9 au lait " * 10, "not UTF-8"),
        ("bad.jsonl", b'{"text": 1}\n', "not a string"),
        ("nofield.jsonl", b'{"body": "x"}\n', "no field 'text'"),
        ("broken.jsonl", b"{not json\n", "cannot read data"),
        ("bad.parquet", b"PAR1garbage", "cannot read data"),
        ("a.csv", b"text\nhello\n", "unsupported data file"),
    ],
)
def test_bad_data_files(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(QtoolError, match=msg):
        data.read_texts(str(p))


def test_missing_data():
    with pytest.raises(QtoolError, match="data not found"):
        data.read_texts("/nonexistent/file.txt")
