import pytest

from engine.store import StorageError, Store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3")
    return Store(s3.uri("root"), s3.storage)


def test_write_read_list(store, tmp_path):
    store.write_bytes("a/b.bin", b"hello")
    store.write_json("a/c.json", {"x": 1})
    assert store.read_bytes("a/b.bin") == b"hello"
    assert store.read_json("a/c.json") == {"x": 1}
    assert store.exists("a/b.bin") and not store.exists("a/zzz")
    assert store.listdir("a") == ["b.bin", "c.json"]
    assert store.listdir("missing") == []
    assert store.glob("a/*.json") == ["a/c.json"]
    local = tmp_path / "part.tar"
    local.write_bytes(b"x" * 10)
    store.put_file(str(local), "a/part.tar")
    assert not local.exists(), "put_file consumes the local file"
    assert store.read_bytes("a/part.tar") == b"x" * 10
    store.rm("a/part.tar")
    assert not store.exists("a/part.tar")


def test_walk_is_sorted_and_hides_dot_names(store):
    for rel in ["z.jpg", "a/2.jpg", "a/10.jpg", "a/.hidden.jpg", ".staging/x.jpg", "b/c/d.png"]:
        store.write_bytes(rel, b"1")
    got = list(store.walk_files())
    assert set(got) == {"z.jpg", "a/2.jpg", "a/10.jpg", "b/c/d.png"}
    assert got == list(store.walk_files()), "deterministic"


def test_local_write_is_atomic_no_temp_left(tmp_path):
    s = Store(str(tmp_path))
    s.write_bytes("f.bin", b"1")
    s.write_bytes("f.bin", b"2")
    assert s.read_bytes("f.bin") == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_staging_is_removed(tmp_path):
    s = Store(str(tmp_path))
    with s.staging("x") as d:
        assert (tmp_path / ".staging").is_dir()
        with open(f"{d}/f", "w") as f:
            f.write("1")
    assert list((tmp_path / ".staging").iterdir()) == []


def test_store_pickles_without_filesystem(s3):
    import pickle

    s = Store(s3.uri("p"), s3.storage)
    s.write_bytes("k", b"v")
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.read_bytes("k") == b"v"


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        Store("gs://bucket/x")
