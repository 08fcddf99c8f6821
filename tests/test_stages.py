"""The stage machinery on toy stages (no model): fingerprints, reuse, recompute downstream, strict refusal, laziness."""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass

import pytest

from hf_minitron.stages import RECORD_NAME, Stage, StageChangedError, StageContext, run_stages


CALLS: collections.Counter = collections.Counter()


@dataclass
class ToyContext(StageContext):
    x: int = 1
    factor: int = 2
    offset: int = 5


class Source(Stage):
    name, outputs, cached = "source", ("x",), False

    def settings(self, ctx):
        return {"x": ctx.x}

    def run(self, ctx, inputs):
        CALLS["source"] += 1
        return {"x": [ctx.x]}


class _JsonStage(Stage):
    def save(self, ctx, outputs, folder):
        with open(os.path.join(folder, "out.json"), "w") as f:
            json.dump({k: outputs[k] for k in self.outputs}, f)

    def load(self, ctx, folder):
        CALLS[f"{self.name}.load"] += 1
        with open(os.path.join(folder, "out.json")) as f:
            return json.load(f)


class Double(_JsonStage):
    name, inputs, outputs = "double", ("x",), ("y",)

    def settings(self, ctx):
        return {"factor": ctx.factor}

    def run(self, ctx, inputs):
        CALLS["double"] += 1
        return {"y": [v * ctx.factor for v in inputs["x"]]}


class Add(_JsonStage):
    name, inputs, outputs = "add", ("y",), ("z",)

    def settings(self, ctx):
        return {"offset": ctx.offset}

    def run(self, ctx, inputs):
        CALLS["add"] += 1
        return {"z": [v + ctx.offset for v in inputs["y"]]}


def toy_stages():
    return [Source(), Double(), Add()]


def run(tmp_path, stages=None, **settings):
    ctx = ToyContext(output_dir=str(tmp_path), **settings)
    CALLS.clear()
    return run_stages(toy_stages() if stages is None else stages, ctx)


def actions(ctx):
    return {name: entry["action"] for name, entry in ctx.report.items()}


def test_first_run_computes_and_rerun_reuses_without_loading(tmp_path):
    ctx = run(tmp_path)
    assert ctx.artifacts["z"] == [7]
    assert actions(ctx) == {"source": "loaded", "double": "computed", "add": "computed"}
    record = json.loads((tmp_path / "add" / RECORD_NAME).read_text())
    assert record["lineage"] == {"source": {"version": 1, "settings": {"x": 1}}, "double": {"version": 1, "settings": {"factor": 2}},
                                 "add": {"version": 1, "settings": {"offset": 5}}}

    ctx = run(tmp_path)
    assert actions(ctx) == {"source": "not needed", "double": "reused", "add": "reused"}
    assert sum(CALLS.values()) == 0  # nothing ran, nothing was read
    assert ctx.artifacts["z"] == [7] and CALLS == {"add.load": 1}


def test_changed_setting_recomputes_the_stage_and_everything_after(tmp_path):
    run(tmp_path)
    ctx = run(tmp_path, factor=3)
    assert actions(ctx) == {"source": "loaded", "double": "computed", "add": "computed"}
    assert ctx.report["double"]["reason"] == "settings changed: double.factor: 2 -> 3"
    assert ctx.report["add"]["reason"] == "settings changed: double.factor: 2 -> 3"
    assert ctx.artifacts["z"] == [8]
    # A change in a non-cached stage is named too.
    ctx = run(tmp_path, factor=3, x=2)
    assert ctx.report["add"]["reason"] == "settings changed: source.x: 1 -> 2"
    assert ctx.artifacts["z"] == [11]
    # Only the last stage changed: the first is reused, and read from its folder.
    ctx = run(tmp_path, factor=3, x=2, offset=0)
    assert actions(ctx) == {"source": "not needed", "double": "reused", "add": "computed"}
    assert ctx.artifacts["z"] == [6] and CALLS["double.load"] == 1 and CALLS["source"] == 0


def test_strict_refuses_before_any_work_and_names_the_setting(tmp_path):
    run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(StageChangedError, match=r"add \(add/\): settings changed: add.offset: 5 -> 6") as err:
        run(tmp_path, offset=6, resume="strict")
    assert "--resume auto" in str(err.value)
    assert sum(CALLS.values()) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    ctx = run(tmp_path, resume="strict")  # unchanged settings: strict reuses
    assert actions(ctx)["add"] == "reused"


def test_never_recomputes_every_cached_stage(tmp_path):
    run(tmp_path)
    ctx = run(tmp_path, resume="never")
    assert actions(ctx) == {"source": "loaded", "double": "computed", "add": "computed"}


def test_failed_save_leaves_no_folder_and_the_rerun_computes(tmp_path, monkeypatch):
    def boom(self, ctx, outputs, folder):
        (tmp_path / "marker").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Add, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double", "marker"]  # no add/, no temporary folder
    monkeypatch.undo()
    ctx = run(tmp_path)
    assert actions(ctx) == {"source": "not needed", "double": "reused", "add": "computed"}


class Train(_JsonStage):
    """Changes its input in place (like training a model) and declares it."""

    name, inputs, outputs, mutates = "train", ("y",), ("w",), ("y",)

    def run(self, ctx, inputs):
        y = inputs["y"]
        y[0] = -1
        return {"w": [1]}


class Report(_JsonStage):
    name, inputs, outputs = "report", ("y", "w"), ("r",)

    def run(self, ctx, inputs):
        return {"r": list(inputs["y"])}


def test_a_mutated_input_is_read_again_from_its_folder(tmp_path):
    ctx = run(tmp_path, stages=[Source(), Double(), Train(), Report()])
    assert ctx.artifacts["r"] == [2]  # not the -1 written in place by Train


class Correct(_JsonStage):
    """Reads `x` and produces a new `x` (like teacher correction replacing the teacher)."""

    name, inputs, outputs = "correct", ("x",), ("x",)

    def run(self, ctx, inputs):
        return {"x": [inputs["x"][0] + 100]}


def test_a_stage_may_replace_the_artifact_it_reads(tmp_path):
    ctx = run(tmp_path, stages=[Source(), Correct(), Double(), Add()])
    assert ctx.artifacts["z"] == [207]
    record = json.loads((tmp_path / "double" / RECORD_NAME).read_text())
    assert list(record["lineage"]) == ["source", "correct", "double"]
    ctx = run(tmp_path, stages=[Source(), Double(), Add()])  # the correction removed: recomputed
    assert ctx.report["double"]["reason"] == "settings changed: stage 'correct' removed"


def test_adding_a_stage_keeps_earlier_results(tmp_path):
    class Square(_JsonStage):
        name, inputs, outputs = "square", ("z",), ("s",)

        def run(self, ctx, inputs):
            return {"s": [v * v for v in inputs["z"]]}

    run(tmp_path)
    ctx = run(tmp_path, stages=[*toy_stages(), Square()])
    assert actions(ctx) == {"source": "not needed", "double": "reused", "add": "reused", "square": "computed"}
    assert ctx.artifacts["s"] == [49]


def test_folder_without_record_is_recomputed_or_refused(tmp_path):
    (tmp_path / "double").mkdir()
    (tmp_path / "double" / "out.json").write_text('{"y": [999]}')
    with pytest.raises(StageChangedError, match="no fingerprint"):
        run(tmp_path, resume="strict")
    ctx = run(tmp_path)
    assert ctx.report["double"]["reason"] == "no fingerprint (made by an older hf-minitron)"
    assert ctx.artifacts["z"] == [7]


def test_a_foreign_folder_is_not_replaced_when_the_stage_says_so(tmp_path):
    class Export(Add):
        replaces_foreign_folder = False

    (tmp_path / "add").mkdir()
    (tmp_path / "add" / "my-notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and was not written by stage 'add': it would be replaced"):
        run(tmp_path, stages=[Source(), Double(), Export()])
    assert (tmp_path / "add" / "my-notes.txt").read_text() == "keep me"


def test_pipeline_errors():
    with pytest.raises(ValueError, match=r"Stage 'add' reads \['y'\], which no earlier enabled stage produces"):
        run_stages([Source(), Add()], ToyContext(output_dir="/nonexistent"))
    with pytest.raises(ValueError, match="unique"):
        run_stages([Source(), Source()], ToyContext(output_dir="/nonexistent"))
    with pytest.raises(ValueError, match="resume"):
        ToyContext(output_dir="/nonexistent", resume="sometimes")


def test_lazy_values_of_a_reused_stage_load_only_when_read(tmp_path):
    from hf_minitron.stages import LazyValue

    class Heavy(_JsonStage):
        name, inputs, outputs = "heavy", ("x",), ("model", "info")

        def run(self, ctx, inputs):
            return {"model": [0] * 3, "info": {"n": 3}}

        def load(self, ctx, folder):
            def model():
                CALLS["model loaded"] += 1
                return [0] * 3

            return {"model": LazyValue(model), "info": {"n": 3}}

    class UsesInfo(_JsonStage):
        name, inputs, outputs = "uses_info", ("info",), ("n",)

        def settings(self, ctx):
            return {"offset": ctx.offset}

        def run(self, ctx, inputs):
            return {"n": inputs["info"]["n"] + ctx.offset}

    run(tmp_path, stages=[Source(), Heavy(), UsesInfo()])
    ctx = run(tmp_path, stages=[Source(), Heavy(), UsesInfo()], offset=1)
    assert ctx.artifacts["n"] == 4 and CALLS["model loaded"] == 0
    assert ctx.artifacts["model"] == [0, 0, 0] and CALLS["model loaded"] == 1
