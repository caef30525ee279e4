import json
from pathlib import Path

import polars as pl
import pytest

from rlaif.errors import RlaifError
from rlaif.prompts import PROMPT_SETS, load_prompt_table, load_prompts, prompt_set_path, resolve_prompt_source

DATA = Path(__file__).resolve().parents[1] / "data"  # the checkout's data/, installed as rlaif.data


def test_a_prompt_that_begins_like_a_header_word_is_still_a_prompt(tmp_path):
    (tmp_path / "p.txt").write_text("caption, a neon sign\nprompts, drawn by a child\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["caption, a neon sign", "prompts, drawn by a child"]


def test_txt_skips_blank_lines_and_repeats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark: kept, it made the first prompt another prompt (another id and
    seed, and no match against the training captions)."""
    (tmp_path / "p.txt").write_text("\ufeffa cat\na dog\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('\ufeff{"prompt": "a cat"}\n', encoding="utf-8")
    (tmp_path / "p.csv").write_text("\ufeffprompt\na cat\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == load_prompts(str(tmp_path / "p.csv")) == ["a cat"]


def test_parti_tsv_reads_every_prompt():
    prompts = load_prompts(str(DATA / "PartiPrompts.tsv"))
    expected = pl.read_csv(DATA / "PartiPrompts.tsv", separator="\t", quote_char=None)["Prompt"]
    assert len(expected) == 1632
    assert prompts == list(dict.fromkeys(p.strip() for p in expected))
    assert any('"' in p for p in prompts)  # quotes inside prompts survive


def test_named_parti_set_is_the_bundled_file_with_categories():
    """``parti`` needs no network: it is data/PartiPrompts.tsv, installed with the package."""
    assert load_prompts("parti") == load_prompts(str(DATA / "PartiPrompts.tsv"))
    table = load_prompt_table("parti")
    assert table.columns == ["prompt", "Category", "Challenge"]
    assert table["Category"].n_unique() == 12 and table["Challenge"].n_unique() == 11


@pytest.mark.parametrize(("name", "count"), [("parti", 1632), ("demo-train", 96), ("demo-eval", 48), ("shapes", 8)])
def test_every_named_set_is_installed_and_loads(name, count):
    path = prompt_set_path(name)
    assert path.is_file() and path.name == PROMPT_SETS[name]
    assert path.read_bytes() == (DATA / PROMPT_SETS[name]).read_bytes()
    assert len(load_prompts(name)) == count


def test_a_limit_keeps_the_prompts_that_hash_lowest_in_file_order():
    import hashlib

    full = load_prompt_table("parti")
    subset = load_prompt_table("parti", limit=200)
    lowest = sorted(full["prompt"], key=lambda text: hashlib.sha256(text.encode()).hexdigest())[:200]
    assert subset["prompt"].to_list() == [text for text in full["prompt"] if text in set(lowest)]
    assert subset.columns == full.columns and subset["Category"].n_unique() >= 8  # a spread, not the first rows
    assert load_prompts("parti", limit=5) == load_prompts("parti", limit=5)
    assert load_prompt_table("demo-eval", limit=10_000).height == load_prompt_table("demo-eval").height


def test_demo_sets_are_disjoint_scenes_of_the_tiny_world():
    from rlaif.shapes import VOCABULARY

    train, held_out = load_prompts("demo-train"), load_prompts("demo-eval")
    assert not set(train) & set(held_out)
    assert {word for p in train + held_out + load_prompts("shapes") for word in p.split()} <= set(VOCABULARY)


def test_config_paths_are_relative_to_the_config_but_names_are_not(tmp_path):
    assert resolve_prompt_source("parti", tmp_path) == "parti"
    assert resolve_prompt_source("demo-train", tmp_path) == "demo-train"
    assert resolve_prompt_source("p.txt", tmp_path) == str(tmp_path / "p.txt")
    assert resolve_prompt_source(str(tmp_path / "q.txt"), Path("elsewhere")) == str(tmp_path / "q.txt")


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
        ("p.jsonl", '{"text": "a"}\n', None, "line 1: no string field 'prompt' (name the field with --prompt-column)"),
        ("p.txt", "a\n", "text", "--prompt-column 'text': prompts file"),
        ("p.doc", "a\n", None, "unsupported type '.doc'"),
        # a table saved as .txt (a new user's trial: the header was sampled as a prompt), and a list saved as .csv
        ("p.txt", "\nprompt,category\na red circle,shapes\n", None, "its first line 'prompt,category' is a table's "
         "header, and a .txt file is read one prompt per line; name it .csv to read it as a table"),
        ("p.txt", "Caption\tlabel\na cat\tanimals\n", None, "name it .tsv"),
        ("p.txt", "prompt,sub-category,\na cat,pets,\n", None, "name it .csv"),  # a trailing comma, a hyphen
        ("p.csv", "a red circle\na blue square\n", None, "(columns: a red circle); choose one with --prompt-column; "
         "or, if it is a list of prompts, one per line, name it .txt"),
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
