import json
import shutil

import polars as pl
import pytest
from conftest import SHARED_DATA

from rlaif.cache import cache_dir
from rlaif.errors import RlaifError
from rlaif.prompts import load_prompts


def test_txt_skips_blank_lines_and_repeats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_parti_tsv_reads_every_prompt():
    prompts = load_prompts(str(SHARED_DATA / "PartiPrompts.tsv"))
    expected = pl.read_csv(SHARED_DATA / "PartiPrompts.tsv", separator="\t", quote_char=None)["Prompt"]
    assert len(expected) == 1632
    assert prompts == list(dict.fromkeys(p.strip() for p in expected))
    assert any('"' in p for p in prompts)  # quotes inside prompts survive


def test_named_parti_set_comes_from_the_cache(tmp_path):
    target = cache_dir() / "downloads" / "PartiPrompts.tsv"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED_DATA / "PartiPrompts.tsv", target)
    assert load_prompts("parti") == load_prompts(str(SHARED_DATA / "PartiPrompts.tsv"))


def test_csv_jsonl_parquet_and_explicit_column(tmp_path):
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a cat, sitting"\n2,a dog\n')
    assert load_prompts(str(tmp_path / "p.csv")) == ["a cat, sitting", "a dog"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n\n" + json.dumps({"prompt": "y"}) + "\n")
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["x", "y"]
    pl.DataFrame({"text": ["u", "v"]}).write_parquet(tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet"), column="text") == ["u", "v"]


@pytest.mark.parametrize(
    ("name", "content", "column", "message"),
    [
        ("empty.txt", "\n  \n", None, "holds no prompts"),
        ("p.csv", "id,text\n1,a\n", None, "has no column 'prompt' or 'Prompt' or 'caption' (columns: id, text)"),
        ("p.csv", "prompt\na\n", "nope", "has no column 'nope'"),
        ("p.jsonl", '{"prompt": "a"}\n{oops\n', None, "line 2: not JSON"),
        ("p.jsonl", '{"text": "a"}\n', None, "line 1: no string field 'prompt'"),
        ("p.doc", "a\n", None, "unsupported type '.doc'"),
    ],
)
def test_bad_prompt_files_name_the_file_and_the_fault(tmp_path, name, content, column, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(RlaifError, match="prompts file") as info:
        load_prompts(str(path), column)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(RlaifError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
