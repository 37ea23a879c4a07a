"""The name sets of lower directories (layers.py): when a directory's names are read,
and that answers read from them are the ones probing gives."""

from __future__ import annotations

import os

from unionfs import layers
from unionfs.layers import LayerStack

NAMES = ["a", "b", "gone", "deep", "x.wh.y", ".wh.gone", ".wh..wh..opq", "missing", "dir"]


def _tree(base):
    """Three lowers: an OCI whiteout in the middle one, an opaque directory in the top one."""
    lowers = [base / f"l{i}" for i in range(3)]
    for i, layer in enumerate(lowers):
        (layer / "d" / "dir").mkdir(parents=True)
        (layer / "d" / "dir" / f"in{i}").write_text(f"{i}\n")
        (layer / "d" / f"only{i}").write_text(f"{i}\n")
    (lowers[2] / "d" / "gone").write_text("hidden\n")
    (lowers[2] / "d" / "deep").write_text("bottom\n")
    (lowers[1] / "d" / ".wh.gone").write_text("")
    (lowers[0] / "d" / "dir" / ".wh..wh..opq").write_text("")
    (lowers[0] / "d" / "x.wh.y").write_text("a plain name\n")
    return [str(p) for p in lowers]


def _answers(stack, names):
    """What each name resolves to in merged ``d`` (and in ``d/dir``): (layer, kind, merge)."""
    root = stack.root_entry()
    d = stack.lookup((), root.dir_layers, root.xwh_layers, b"d")
    out = {}
    for name in names:
        e = stack.lookup((b"d",), d.dir_layers, d.xwh_layers, os.fsencode(name))
        out[name] = None if e is None else (e.layer, e.is_dir, e.dir_layers)
        if e is not None and e.is_dir:
            for i in range(3):
                sub = stack.lookup((b"d", b"dir"), e.dir_layers, e.xwh_layers, b"in%d" % i)
                out[f"{name}/in{i}"] = None if sub is None else sub.layer
    return out


def test_answers_from_the_sets_are_the_probes(tmp_path, monkeypatch):
    lowers = _tree(tmp_path)
    names = NAMES + [f"only{i}" for i in range(3)]
    probing = LayerStack(lowers, None)
    indexed = LayerStack(lowers, None)
    try:
        monkeypatch.setattr(layers, "NAME_INDEX_SMALL_DIR", -1)
        monkeypatch.setattr(layers, "NAME_INDEX_MISS_BYTES", 0)  # never read
        probed = _answers(probing, names)
        assert not probing._names
        monkeypatch.undo()
        first, second = _answers(indexed, names), _answers(indexed, names)
        assert (1, (b"d",)) in indexed._names  # read at a miss
    finally:
        probing.close()
        indexed.close()
    assert first == second == probed
    assert probed["gone"] is None  # the OCI whiteout of layer 1 hides layer 2's
    assert probed["deep"][0] == 2
    assert probed["dir"][2] == (0,)  # opaque in the top layer: no merge below
    assert probed["dir/in1"] is None
    assert probed["x.wh.y"] == (0, False, None)
    assert probed[".wh.gone"] is None and probed[".wh..wh..opq"] is None


def test_a_big_directory_is_read_only_after_misses_worth_its_size(tmp_path, monkeypatch):
    lowers = _tree(tmp_path)
    size = os.stat(os.path.join(lowers[1], "d")).st_size
    monkeypatch.setattr(layers, "NAME_INDEX_SMALL_DIR", size - 1)  # "big"
    monkeypatch.setattr(layers, "NAME_INDEX_MISS_BYTES", size // 3 + 1)  # read at the 3rd
    stack = LayerStack(lowers, None)
    try:
        root = stack.root_entry()
        d = stack.lookup((), root.dir_layers, root.xwh_layers, b"d")
        for k, name in enumerate((b"nope1", b"nope2", b"nope3")):
            assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, name) is None
            assert ((1, (b"d",)) in stack._names) == (k == 2), k
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"gone") is None
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"deep").layer == 2
    finally:
        stack.close()


def test_names_are_kept_only_where_the_watch_says(tmp_path):
    """-o live: a directory its watch does not cover is probed every time, and what
    forget_dir drops (a lower directory moved away) is read again."""
    lowers = _tree(tmp_path)
    stack = LayerStack(lowers, None)
    try:
        stack.keep_names = lambda layer, path: layer != 1
        root = stack.root_entry()
        d = stack.lookup((), root.dir_layers, root.xwh_layers, b"d")
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"nope") is None
        assert (0, (b"d",)) in stack._names and (1, (b"d",)) not in stack._names
        os.unlink(os.path.join(lowers[1], "d", ".wh.gone"))  # layer 1 changed
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"gone").layer == 2
        stack.forget_dir(0, ())
        assert not any(key[0] == 0 for key in stack._names)
    finally:
        stack.close()


def test_upper_names_are_never_kept(tmp_path):
    """The upper changes under the daemon: its directories are always probed."""
    lowers = _tree(tmp_path)
    upper = tmp_path / "up"
    (upper / "d").mkdir(parents=True)
    stack = LayerStack(lowers, str(upper))
    try:
        root = stack.root_entry()
        d = stack.lookup((), root.dir_layers, root.xwh_layers, b"d")
        assert d.dir_layers[0] == 0
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"new") is None
        (upper / "d" / "new").write_text("")
        assert stack.lookup((b"d",), d.dir_layers, d.xwh_layers, b"new").layer == 0
        assert not any(key[0] == 0 for key in stack._names)
    finally:
        stack.close()
