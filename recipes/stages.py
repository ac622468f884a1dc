"""Multi-stage methods as recipe stages, each one resumable.

A method whose config lists `stages:` is run stage by stage, in order, in place of the single
"student + METHOD" run of `recipes.distill`: generation 0 trains a model from the labels and
generation 1 distils from it (`gt_self_distill`); a pre-pass computes something from the teacher
once (`lelp`'s projections); a known-class teacher is trained before novel-class discovery
(`crkd`). Every stage writes under OUT/stages/<name>/seed<S>/:

    stage.json              what ran: config fingerprint, status ("running" / "done"), results
    checkpoints/last.ckpt   train stages: Lightning checkpoint of the last finished epoch
    model.ckpt              train stages: the final model (a later stage's teacher or start)
    artifact.pt             prepass stages: the tensors the pre-pass computed

Re-running the same command skips every stage whose stage.json says "done" with the same
fingerprint, resumes an interrupted train stage from checkpoints/last.ckpt (the resume of
docs/architecture.md contract 8: bit-exact on CPU with `deterministic=True`), and recomputes an
interrupted pre-pass (one pass, nothing to resume). A stage whose configuration changed since it
ran is an error (delete its folder or use another --out): its files would no longer belong to
this configuration. A stage's fingerprint includes those of the stages it reads, so changing
generation 0 also invalidates generation 1; trainer options (devices, progress bar, batch limits)
are not part of it. Files are written atomically (temporary file + rename), and stage.json says
"done" only after the model / artifact is on disk. Under DDP every rank runs the stages and rank 0
writes the files (not tested under DDP yet).

A stage is a mapping; what it does not set comes from the method's config:

    name          required, unique, letters / digits / `_` / `-` / `.`
    kind          "train" (default) or "prepass"
    teacher       "recipe" (default: the recipe's teacher, `--teacher` or the cached one),
                  "none" (no teacher: label terms only), "previous" (the train stage just before),
                  or the name of an earlier train stage (its model.ckpt, frozen)
    teacher_pad_classes   true when that teacher predicts fewer classes than the stage's data (a
                  known-class teacher): its logits are padded with NaN up to the data's class
                  count (`toolkit.distill.crkd.PadClasses`), for terms that read its first K only
    init_from     an earlier train stage: the student starts from its weights (every tensor of the
                  same name and shape; a classifier with more classes takes the rows it has)
    repeat        N: the entry stands for N stages NAME1..NAMEN (from NAME{start}, `start: 1`);
                  with teacher "previous", each is taught by the one before
    terms         this stage's terms (they replace the method's `terms`); a string "stage:NAME"
                  anywhere inside becomes the path of stage NAME's artifact.pt / model.ckpt.
                  `--method.*` options reach the method's term in every stage that has one, but
                  not the keys a stage sets itself in `terms` or `term_args` (gen0's alpha: 1 stays)
    term_args     {term key: {argument: value}} merged into this stage's terms (the method's, or
                  its own): e.g. `{lelp: {artifact: "stage:lelp_prepass"}}` hands a pre-pass on
    term          prepass only: the key of the term whose `prepass(teacher, datamodule) ->
                  dict[str, Tensor]` computes the artifact (the term loads it back from
                  `artifact="stage:NAME"`)
    student, student_args, epochs, optimizer, scheduler, data, data_args, trainer
                  as at the top level, for this stage only (`--fast` shrinks the top-level
                  `epochs`; a stage's own `epochs` stays as written)
    metric        the key of the stage's results shown as its accuracy (default "test_acc")

A train stage's results are test_acc, train_seconds and what each term's
`stage_metrics(module, datamodule) -> dict[str, float]` returns (e.g. CRKD's clustering
accuracy). The method's accuracy in the recipe's table is the last stage's `metric`; every stage
gets a row, and results.json has them all under "stages".
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.common import build_data, fingerprint, is_global_zero, make_trainer, merge_layer, test_accuracy

KINDS = ("train", "prepass")
STAGE_KEYS = {
    "name",
    "kind",
    "teacher",
    "teacher_pad_classes",
    "init_from",
    "repeat",
    "start",
    "terms",
    "term_args",
    "term",
    "metric",
    "student",
    "student_args",
    "epochs",
    "optimizer",
    "scheduler",
    "data",
    "data_args",
    "trainer",
}
OVERRIDES = ("student", "student_args", "epochs", "optimizer", "scheduler", "data", "data_args", "trainer")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
REF = "stage:"


# -- the plan --------------------------------------------------------------------------------
def expand_stages(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The config's `stages`, checked and normalised: `repeat` expanded, `teacher` resolved to
    "recipe", "none" or a stage name, `kind` filled in. Errors say which stage and how to fix it."""
    raw = cfg.get("stages")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise ValueError("`stages` must be a non-empty list of mappings, each with at least a `name`")
    stages: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise ValueError(f"stage #{i} must be a mapping with a `name`, got {entry!r}")
        unknown = set(entry) - STAGE_KEYS
        if unknown:
            raise ValueError(
                f"stage #{i} has unknown keys {sorted(unknown)}; stage keys: {sorted(STAGE_KEYS)}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"stage #{i} needs a `name` of letters, digits, '_', '-' or '.', got {name!r}")
        repeat = entry.get("repeat")
        if repeat is None:
            copies = [dict(entry)]
        else:
            if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                raise ValueError(f"stage {name!r}: repeat must be an integer >= 1, got {repeat!r}")
            start = entry.get("start", 1)
            copies = [{**entry, "name": f"{name}{start + k}"} for k in range(repeat)]
        for st in copies:
            st.pop("repeat", None)
            st.pop("start", None)
            stages.append(st)

    seen: dict[str, dict[str, Any]] = {}
    for i, st in enumerate(stages):
        name = st["name"]
        if name in seen:
            raise ValueError(f"two stages are named {name!r}: stage names must be unique")
        kind = st.setdefault("kind", "train")
        if kind not in KINDS:
            raise ValueError(f"stage {name!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        teacher = st.get("teacher", "recipe")
        if teacher is None or teacher is False:
            teacher = "none"
        if teacher == "previous":
            previous = [s for s in stages[:i] if s["kind"] == "train"]
            if not previous:
                raise ValueError(f"stage {name!r}: teacher 'previous' but no train stage comes before it")
            teacher = previous[-1]["name"]
        if teacher not in ("recipe", "none"):
            _check_earlier(name, "teacher", teacher, seen, train_only=True)
        st["teacher"] = teacher
        if st.get("init_from") is not None:
            _check_earlier(name, "init_from", st["init_from"], seen, train_only=True)
        if kind == "prepass":
            if not isinstance(st.get("term"), str):
                raise ValueError(
                    f"prepass stage {name!r} needs `term`: the key of the term (in its terms) that computes it"
                )
        elif "term" in st:
            raise ValueError(f"stage {name!r}: `term` is for prepass stages only")
        if st.get("term_args") is not None and not (
            isinstance(st["term_args"], Mapping)
            and all(isinstance(v, Mapping) for v in st["term_args"].values())
        ):
            raise ValueError(f"stage {name!r}: term_args must map term keys to mappings of arguments")
        for ref in _refs([st.get("terms"), st.get("term_args")]):
            _check_earlier(name, "a 'stage:' reference", ref, seen, train_only=False)
        if "epochs" in st and (not isinstance(st["epochs"], int) or st["epochs"] < 1):
            raise ValueError(f"stage {name!r}: epochs must be an integer >= 1, got {st['epochs']!r}")
        seen[name] = st
    return stages


def _check_earlier(stage: str, what: str, ref: Any, seen: Mapping[str, Any], train_only: bool) -> None:
    if ref not in seen:
        raise ValueError(
            f"stage {stage!r}: {what} {ref!r} is not an earlier stage; earlier stages: {sorted(seen) or 'none'}"
        )
    if train_only and seen[ref]["kind"] != "train":
        raise ValueError(f"stage {stage!r}: {what} {ref!r} is a {seen[ref]['kind']} stage, not a train stage")


def _refs(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj[len(REF) :]] if obj.startswith(REF) else []
    if isinstance(obj, Mapping):
        return [r for v in obj.values() for r in _refs(v)]
    if isinstance(obj, (list, tuple)):
        return [r for v in obj for r in _refs(v)]
    return []


def _resolve_refs(obj: Any, paths: Mapping[str, str]) -> Any:
    if isinstance(obj, str) and obj.startswith(REF):
        return paths[obj[len(REF) :]]
    if isinstance(obj, Mapping):
        return {k: _resolve_refs(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, paths) for v in obj]
    return obj


def stage_config(cfg: Mapping[str, Any], stage: Mapping[str, Any]) -> dict[str, Any]:
    """The method's config with this stage's overrides (its `terms` replace the method's)."""
    scfg = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "stages"}
    for key in OVERRIDES:
        if key in stage:
            scfg = merge_layer(scfg, {key: stage[key]})
    terms = scfg.get("terms") or {scfg["method"]: {"distiller": scfg["method"]}}  # the recipe's default terms
    owner = next(
        (v for v in terms.values() if isinstance(v, Mapping) and v.get("distiller") == scfg["method"]), None
    )
    if "terms" in stage:
        scfg["terms"] = copy.deepcopy(stage["terms"])
        owner = next(
            (
                v
                for v in stage["terms"].values()
                if isinstance(v, Mapping) and v.get("distiller") == scfg["method"]
            ),
            None,
        )
        # `--method.*` options fill what the stage's own entry leaves unset (generation 0's alpha = 1 stays)
        if owner is not None:
            scfg["method_args"] = {k: v for k, v in (scfg.get("method_args") or {}).items() if k not in owner}
    if owner is None:  # they belong to the stages that run the method's term
        scfg["method_args"] = {}
    for key, args in (stage.get("term_args") or {}).items():
        entry = (scfg.get("terms") or {}).get(key)
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"stage {stage['name']!r}: term_args names term {key!r}, which is not a term of this stage "
                f"(terms: {sorted(scfg.get('terms') or {})})"
            )
        scfg["terms"][key] = {**entry, **copy.deepcopy(dict(args))}
        if entry.get("distiller") == scfg["method"]:  # the stage's own values win over --method.*
            scfg["method_args"] = {k: v for k, v in (scfg.get("method_args") or {}).items() if k not in args}
    return scfg


def stage_dir(out: str | Path, name: str, seed: int) -> Path:
    return Path(out) / "stages" / name / f"seed{seed}"


def _fingerprint(
    scfg: Mapping[str, Any], stage: Mapping[str, Any], seed: int, deps: Mapping[str, str]
) -> str:
    keys = ("data", "data_args", "student", "student_args", "epochs", "optimizer", "scheduler", "terms")
    # `terms` already holds term_args; references stay "stage:NAME" (paths differ between runs)
    view = {k: scfg.get(k) for k in keys}
    view["method_args"] = scfg.get("method_args")
    view["stage"] = {k: stage.get(k) for k in ("kind", "teacher", "teacher_pad_classes", "init_from", "term")}
    if stage["teacher"] == "recipe":
        view["recipe_teacher"] = scfg.get("teacher") or scfg.get("teacher_train")
    view["seed"] = seed
    view["deps"] = dict(sorted(deps.items()))
    return fingerprint(view)


# -- records ---------------------------------------------------------------------------------
def read_record(sdir: Path) -> dict[str, Any] | None:
    path = sdir / "stage.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); delete {sdir} to run this stage again") from e


def _write_atomic(path: Path, text: str) -> None:
    if not is_global_zero():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_record(sdir: Path, record: Mapping[str, Any]) -> None:
    _write_atomic(sdir / "stage.json", json.dumps(record, indent=2, default=str))


# -- running ---------------------------------------------------------------------------------
def run_stages(
    cfg: Mapping[str, Any],
    seed: int,
    out: str | Path,
    teacher: Any = None,
    callbacks: Mapping[str, list] | None = None,
) -> list[dict[str, Any]]:
    """Run (or skip, or resume) every stage of `cfg` for one seed; returns each stage's record
    (`name`, `kind`, `status`, `fingerprint`, `path`, `results`). `teacher` is the recipe's teacher
    (for stages with teacher "recipe"); `callbacks` maps a stage name to extra Lightning callbacks
    for its trainer (tests use it to interrupt a stage)."""
    records: dict[str, dict[str, Any]] = {}
    for st in expand_stages(cfg):
        name = st["name"]
        scfg = stage_config(cfg, st)
        sdir = stage_dir(out, name, seed)
        deps = {d: records[d]["fingerprint"] for d in _dependencies(st)}
        fp = _fingerprint(scfg, st, seed, deps)
        old = read_record(sdir)
        if old is not None and old.get("fingerprint") != fp:
            raise ValueError(
                f"stage {name!r} in {sdir} was run with another configuration (or an earlier stage changed). "
                f"Delete {sdir.parent} to run it again, or use another --out."
            )
        if old is not None and old.get("status") == "done":
            print(f"stage {name} (seed {seed}): done before, skipped ({sdir})", flush=True)
            records[name] = old
            continue
        resuming = (sdir / "checkpoints" / "last.ckpt").exists()
        print(
            f"stage {name} (seed {seed}): {'resuming from its last checkpoint' if resuming else 'running'} ({sdir})",
            flush=True,
        )
        record = {"name": name, "kind": st["kind"], "status": "running", "fingerprint": fp, "seed": seed}
        _write_record(sdir, record)
        paths = {n: r["path"] for n, r in records.items()}
        runner = _run_train if st["kind"] == "train" else _run_prepass
        path, results = runner(
            scfg, st, seed, Path(out), sdir, teacher, paths, (callbacks or {}).get(name, [])
        )
        record.update(status="done", path=str(path), results=results)
        _write_record(sdir, record)
        records[name] = record
    return list(records.values())


def _dependencies(st: Mapping[str, Any]) -> list[str]:
    deps = [st["teacher"]] if st["teacher"] not in ("recipe", "none") else []
    if st.get("init_from"):
        deps.append(st["init_from"])
    return list(dict.fromkeys([*deps, *_refs([st.get("terms"), st.get("term_args")])]))


def _stage_teacher(st: Mapping[str, Any], recipe_teacher: Any, paths: Mapping[str, str], num_classes: int):
    from toolkit.distill import Teacher

    if st["teacher"] == "none":
        return None
    if st["teacher"] == "recipe":
        if recipe_teacher is None:
            raise ValueError(f"stage {st['name']!r} uses the recipe's teacher but none was given")
        teacher = recipe_teacher
    else:
        teacher = Teacher.from_checkpoint(paths[st["teacher"]])
    if st.get("teacher_pad_classes"):
        from toolkit.distill.crkd import PadClasses

        if teacher.is_ensemble:
            raise ValueError(f"stage {st['name']!r}: teacher_pad_classes supports a single teacher network")
        teacher = Teacher(PadClasses(teacher.nets[0], num_classes))
    return teacher


def _stage_terms(scfg: Mapping[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    from recipes.distill import method_terms

    return _resolve_refs(method_terms(dict(scfg)), paths)


def _build_module(scfg: Mapping[str, Any], dm: Any, teacher: Any, terms: Any, stage: str | None = None):
    from recipes.distill import teacher_cache_args
    from toolkit.modules import ClassificationModule, DistillationModule

    common = {
        "num_classes": dm.num_classes,
        "in_chans": dm.in_chans,
        "model_kwargs": scfg.get("student_args"),
        "optimizer": scfg.get("optimizer"),
        "scheduler": scfg.get("scheduler"),
    }
    if teacher is None:
        return ClassificationModule(scfg["student"], loss=terms, **common)
    # a stage's cache on disk only with --teacher-cache DIR (without it, as before: no cache)
    cache = teacher_cache_args(dict(scfg), dm, terms, stage) if scfg.get("teacher_cache_dir") else {}
    return DistillationModule(scfg["student"], teacher, terms=terms, **cache, **common)


def _run_train(scfg, st, seed, out, sdir, recipe_teacher, paths, extra_callbacks):
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(scfg["data"], scfg["data_args"], seed=seed)
    dm.setup("fit")
    teacher = _stage_teacher(st, recipe_teacher, paths, dm.num_classes)
    module = _build_module(scfg, dm, teacher, _stage_terms(scfg, paths), st["name"])
    if st.get("init_from"):
        load_matching(module.model, paths[st["init_from"]])
    checkpoint = _epoch_checkpoint(sdir / "checkpoints" / "last.ckpt")
    trainer = make_trainer(
        scfg,
        out,
        f"stage_{st['name']}_seed{seed}",
        scfg["epochs"],
        checkpoints=False,
        enable_checkpointing=True,
        callbacks=[checkpoint, *extra_callbacks],
    )
    last = sdir / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
    if trainer.state.status.value != "finished":
        raise RuntimeError(
            f"stage {st['name']!r} did not finish ({trainer.state.status.value}); run the same command again to resume it"
        )
    seconds = time.perf_counter() - started
    model_path = sdir / "model.ckpt"
    tmp = sdir / "model.ckpt.tmp"
    trainer.save_checkpoint(str(tmp))
    if trainer.is_global_zero:
        os.replace(tmp, model_path)
    trainer.strategy.barrier("stage model.ckpt")  # later stages (every rank) read it
    results: dict[str, Any] = {"test_acc": test_accuracy(trainer, module, dm), "train_seconds": seconds}
    for term in module.loss_terms.values():
        metrics = getattr(term, "stage_metrics", None)
        if callable(metrics):
            results.update({k: float(v) for k, v in metrics(module, dm).items()})
    return model_path, results


def _epoch_checkpoint(path: Path):
    """A Checkpoint callback writing `path` at the end of every training epoch, atomically.

    Lightning's ModelCheckpoint(save_top_k=0, save_last=True) writes last.ckpt only when training
    ends, and writes in place (a kill while writing leaves a torn file): here an interrupted stage
    loses at most the epoch it was in, and last.ckpt is always a complete checkpoint."""
    from lightning.pytorch.callbacks import Checkpoint

    class EpochCheckpoint(Checkpoint):  # a Checkpoint: Lightning runs it after the other callbacks
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            tmp = path.with_name(path.name + ".tmp")
            trainer.save_checkpoint(str(tmp))  # every rank calls it; rank 0 writes
            if trainer.is_global_zero:
                os.replace(tmp, path)

    return EpochCheckpoint()


def _run_prepass(scfg, st, seed, out, sdir, recipe_teacher, paths, extra_callbacks):
    import lightning as L
    import torch

    from toolkit.modules.config import build_terms

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(scfg["data"], scfg["data_args"], seed=seed)
    dm.setup("fit")
    teacher = _stage_teacher(st, recipe_teacher, paths, dm.num_classes)
    terms = build_terms(_stage_terms(scfg, paths))
    if st["term"] not in terms:
        raise ValueError(f"prepass stage {st['name']!r}: no term {st['term']!r} in its terms {sorted(terms)}")
    term = terms[st["term"]][0]
    if not callable(getattr(term, "prepass", None)):
        raise ValueError(
            f"prepass stage {st['name']!r}: term {st['term']!r} ({type(term).__name__}) has no prepass(teacher, datamodule)"
        )
    started = time.perf_counter()
    state = term.prepass(teacher, dm)
    path = sdir / "artifact.pt"
    if is_global_zero():
        sdir.mkdir(parents=True, exist_ok=True)
        tmp = sdir / "artifact.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    return path, {"seconds": time.perf_counter() - started}


def load_matching(model: Any, path: str | Path) -> list[str]:
    """Copy into `model` the weights of the model in a toolkit checkpoint: every tensor with the
    same name and shape, and the leading rows of a tensor whose first dimension is larger in
    `model` (a classifier over more classes: the classes the checkpoint knows come first).
    Returns the names copied; none at all is an error."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    source = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    copied = []
    with torch.no_grad():
        for key, own in model.state_dict().items():
            src = source.get(key)
            if src is None or src.dim() != own.dim():
                continue
            if src.shape == own.shape:
                own.copy_(src)
            elif src.dim() >= 1 and src.shape[1:] == own.shape[1:] and src.shape[0] < own.shape[0]:
                own[: src.shape[0]].copy_(src)
            else:
                continue
            copied.append(key)
    if not copied:
        raise ValueError(f"no tensor of {path} matches the student: init_from needs the same architecture")
    return copied


# -- the recipe's side -----------------------------------------------------------------------
def run_method(
    cfg: Mapping[str, Any], seed: int, out: str | Path, teacher: Any, runs: dict[str, dict[str, list]]
) -> list[dict[str, Any]]:
    """`recipes.distill`'s hook: run the stages of one method for one seed and add the last
    stage's `metric` (and the stages' training time) to `runs[method]`."""
    records = run_stages(cfg, seed, out, teacher)
    last_stage = expand_stages(cfg)[-1]
    metric = last_stage.get("metric", "test_acc")
    results = records[-1]["results"]
    if metric not in results:
        raise ValueError(f"stage {last_stage['name']!r} has no result {metric!r}; it has {sorted(results)}")
    run = runs.setdefault(cfg["method"], {"acc": [], "seconds": []})
    run["acc"].append(float(results[metric]))
    run["seconds"].append(sum(float(r["results"].get("train_seconds", 0.0)) for r in records))
    return records


def table_rows(
    cfg: Mapping[str, Any], per_seed: Sequence[Sequence[Mapping[str, Any]]]
) -> list[tuple[str, str, str]]:
    """One row per stage: its `metric` (mean over seeds) and training time."""
    from recipes.common import fmt

    rows = []
    for i, st in enumerate(expand_stages(cfg)):
        metric = st.get("metric", "test_acc")
        values = [float(recs[i]["results"][metric]) for recs in per_seed if metric in recs[i]["results"]]
        secs = [float(recs[i]["results"].get("train_seconds", 0.0)) for recs in per_seed]
        label = f"  {cfg['method']} stage {st['name']}" + ("" if metric == "test_acc" else f" ({metric})")
        rows.append((label, fmt(values) if values else "-", f"{sum(secs) / max(1, len(secs)):.1f}"))
    return rows
