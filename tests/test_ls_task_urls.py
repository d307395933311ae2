"""The image URLs a bulk run gives new tasks, and how it finds the task a storage sync made for an image.

Label Studio's local-files sync writes `/data/local-files/?d=` + `urllib.parse.quote(relative path)`, and serves
the file Django's query parsing decodes ('+' is a space, '#' ends the URL). For ANY file name, the URL a run
makes must (a) make Label Studio read back exactly that name, and (b) be the same task URL as the sync's, so
the run attaches its prediction to the synced task instead of creating a second one.
"""
from __future__ import annotations

from urllib.parse import parse_qs, quote, urlsplit

from hypothesis import example, given
from hypothesis import strategies as st

from connectors.label_studio_client import TaskRef, canonical_url, index_urls, url_template

DEFAULT = "/data/local-files/?d={file_name}"
names = st.text(min_size=1, max_size=40)


def served_name(url: str) -> str:
    """The `d` value Label Studio's view reads from a task URL (Django's QueryDict: parse_qs rules)."""
    (value,) = parse_qs(urlsplit(url).query, keep_blank_values=True)["d"]
    return value


@given(name=names)
@example(name="sp ace.png")
@example(name="a+b.png")
@example(name="c#d.png")
@example(name="e&f=g.png")
@example(name="100%25.png")
@example(name="ünï/ÿ.png")
def test_a_created_task_url_reads_back_the_file_name_and_matches_the_synced_task(name):
    made = url_template(DEFAULT)(name, name, None)
    assert served_name(made) == name
    synced = f"/data/local-files/?d={quote(name)}"
    assert canonical_url(made) == canonical_url(synced)
    assert index_urls([TaskRef(7, None, synced)])[canonical_url(made)].id == 7


@given(a=names, b=names)
def test_two_names_never_share_a_canonical_url(a, b):
    make = url_template(DEFAULT)
    if a != b:
        assert canonical_url(make(a, a, None)) != canonical_url(make(b, b, None))


def test_spellings_of_one_file_are_one_url_and_other_files_are_not():
    same = ["/data/local-files/?d=x/a%20b.png", "/data/local-files/?d=x/a+b.png", "/data/local-files/?d=x/a b.png",
            "/data/local-files/?d=x%2Fa%20b.png"]
    assert len({canonical_url(u) for u in same}) == 1
    assert canonical_url("/data/local-files/?d=x/a%2Bb.png") != canonical_url(same[0])
    assert canonical_url("HTTP://Host:8080/img/a%20b.png") == canonical_url("http://host:8080/img/a b.png")


def test_cloud_storage_keys_go_in_raw():
    """s3:// and gs:// storages write object keys raw: a run's URL must be spelled the same way."""
    make = url_template("s3://bucket/{file_name}")
    assert make("a b+c.png", None, None) == "s3://bucket/a b+c.png"
    assert canonical_url("s3://bucket/a b+c.png") == "s3://bucket/a b+c.png"
