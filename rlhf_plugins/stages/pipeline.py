"""The whole pipeline in one command: a loop over the registered stages (family ``stages``).

Each stage is a :class:`rlhf_plugins.sdk.Stage` (the built-ins in `builtin.py`, third-party ones
from their plugins); this module only orders them, hands each stage the outputs of the earlier
ones (:class:`StageContext`), evaluates held-out verifiable accuracy after every stage that
produces a policy, skips stages whose output is up to date (same config hash), resumes
interrupted ones from their last checkpoint, and writes the report.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..cache import atomic_write_text
from ..config import at, build_dataclass, config_hash, load_stage_config, load_yaml, suggest
from ..errors import ConfigError, RlhfPluginsError
from ..report import write_report
from ..stage_api import StageContext, StageOutputs
from .distributed import is_main_process, main_process_first
from .gate import GateSettings, carried_eval, check_gate, decide
from .stage_runs import StageRecord, run_stage

logger = logging.getLogger(__name__)

#: the stages a pipeline runs when its config lists none
STAGES = ("sft", "reward_model", "rejection_sampling", "ppo")
#: the files `write_data` writes (keys of `Pipeline.paths`)
DATA_FILES = ("sft", "preference", "preference_eval", "rl", "eval")


def registered_stages() -> dict[str, Any]:
    """Every registered stage by name (built-in and from plugins)."""
    from .. import registry

    family = registry().stages
    return {name: family.get(name) for name in family.names()}


@dataclass
class TaskSettings:
    """The built-in synthetic verifiable task: sizes and seed."""

    n_train: int = 256
    n_eval: int = 40
    seed: int = 0
    #: the held-out problems every stage is evaluated on: `test` (what a report states), or
    #: `validation` (disjoint from both; for tuning a config without looking at `test`)
    eval_split: str = "test"

    def __post_init__(self) -> None:
        for name in ("n_train", "n_eval"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.eval_split not in ("test", "validation"):
            raise ConfigError(f"eval_split: expected 'test' or 'validation', got {self.eval_split!r}")


@dataclass
class EvalSettings:
    """Held-out evaluation after every stage (greedy decoding, `exact_answer`)."""

    max_new_tokens: int = 96
    batch_size: int = 16
    samples_in_report: int = 3
    reward_functions: list[str] = field(default_factory=lambda: ["exact_answer"])
    #: stop a completion once its text matches (the task's answer line); null: run to the limit
    stop_pattern: str | None = r"The answer is\s*\S+?\.(?=\s)"
    #: the dtype the evaluated models run in (null: as loaded - float32 on CPU, bf16/fp16 on GPU)
    dtype: str | None = None

    def __post_init__(self) -> None:
        from ..models import check_dtype

        check_dtype(self.dtype, "dtype")


@dataclass
class PipelineSettings:
    """A pipeline config: shared settings plus one section per stage (each stage's own fields)."""

    model: str | None = None
    output_dir: str = "runs/quickstart"
    seed: int = 0
    template: str = "chatml"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    task: TaskSettings = field(default_factory=TaskSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    quantization: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    #: stages whose model is kept only when it beats its start on validation problems (gate.py)
    gate: GateSettings = field(default_factory=GateSettings)
    smoke: dict[str, Any] = field(default_factory=dict)
    #: empty every selected stage's folder and rerun it (also what no record of ours claims)
    overwrite: bool = False
    #: each stage's own section (top-level keys of the YAML named after a registered stage)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..protocols import member

        known = registered_stages()
        unknown = [s for s in self.stages if s not in known]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; available: {list(known)}")
        for name, section in self.sections.items():
            if not isinstance(section, Mapping):
                raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
        policy_stages = [n for n, st in known.items() if "policy" in member(st, "stages", "produces")]
        check_gate(self.gate, list(known), policy_stages, self.task.eval_split)

    def section(self, name: str) -> dict[str, Any]:
        """Stage `name`'s own section ({} when the config has none)."""
        return dict(self.sections.get(name) or {})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, recursively for nested mappings."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_pipeline_config(source: str | os.PathLike | Mapping[str, Any], *, smoke: bool = False,
                         output_dir: str | None = None) -> PipelineSettings:
    """Read a pipeline YAML (or mapping); `smoke` merges its `smoke:` section over the rest."""
    data = dict(source) if isinstance(source, Mapping) else load_yaml(source)
    where = "config" if isinstance(source, Mapping) else str(source)
    if smoke:
        data = deep_merge(data, data.get("smoke") or {})
    if output_dir is not None:
        data["output_dir"] = output_dir
    stages = registered_stages()
    fields = {f.name for f in dataclasses.fields(PipelineSettings)} - {"sections"}
    sections = {}
    for key in list(data):
        if key in stages and key not in fields:
            sections[key] = data.pop(key) or {}
        elif key not in fields:
            raise ConfigError(f"{at(where, str(key))}: unknown field{suggest(str(key), sorted(fields | set(stages)))}")
    return build_dataclass(PipelineSettings, {**data, "sections": sections}, where)


# --- the stages ---------------------------------------------------------------------------


def locate(message: str, where: str) -> str:
    """A stage check's `field: text` message located in the config (`file: section.field: text`)."""
    if message.startswith(where) or ": " in where and message.startswith(where.split(": ")[0]):
        return message
    head, sep, rest = message.partition(":")
    if sep and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return f"{where}.{head}:{rest}"
    return f"{where}: {message}"


def _located_check(where: str, check: Any, *args: Any) -> None:
    """Run a stage check; its error names the section (`file: stage.field`)."""
    try:
        check(*args)
    except ConfigError as exc:
        raise ConfigError(locate(str(exc), where)) from None
    except RlhfPluginsError as exc:
        raise type(exc)(f"{where}: {exc}") from None


class Pipeline:
    """Runs the configured stages in order, threading each stage's output into the next."""

    def __init__(self, settings: PipelineSettings, config_label: str = "", smoke: bool = False):
        self.settings = settings
        self.run_dir = Path(settings.output_dir)
        self.data_dir = self.run_dir / "data"
        self.config_label = config_label
        self.smoke = smoke
        self.records: dict[str, StageRecord] = {}
        self.evals: dict[str, dict[str, Any]] = {}

    # shared pieces ------------------------------------------------------------------------
    def base_model(self) -> str:
        from ..models import resolve_model
        return resolve_model(self.settings.model)

    def common(self) -> dict[str, Any]:
        """Fields every training stage inherits unless its section sets them."""
        out: dict[str, Any] = {"template": self.settings.template, "seed": self.settings.seed}
        if self.settings.lora is not None:
            out["lora"] = self.settings.lora
        if self.settings.quantization is not None:
            out["quantization"] = self.settings.quantization
        return out

    def write_data(self) -> dict[str, str]:
        """The synthetic task's datasets as JSONL under `run_dir/data` (deterministic)."""
        from ..data import synth

        t = self.settings.task
        files: dict[str, tuple[str, Any]] = {
            "sft": ("sft_train.jsonl", synth.sft_rows(t.n_train, t.seed, "train")),
            "preference": ("preference_train.jsonl", synth.preference_rows(t.n_train, t.seed + 1, "train")),
            "preference_eval": (f"preference_{t.eval_split}.jsonl",
                                synth.preference_rows(t.n_eval, t.seed + 1, t.eval_split)),
            "rl": ("rl_train.jsonl", synth.rl_rows(t.n_train, t.seed + 2, "train")),
            "eval": (f"rl_{t.eval_split}.jsonl", synth.rl_rows(t.n_eval, t.seed, t.eval_split)),
        }
        if self.settings.gate.stages:  # the gate's problems: validation, never the test split reported
            g = self.settings.gate
            files["gate"] = ("rl_validation_gate.jsonl", synth.rl_rows(g.n_problems, g.seed, "validation"))
        paths = {}
        for key, (name, rows) in files.items():
            path = self.data_dir / name
            synth.write_jsonl(path, rows)
            paths[key] = str(path)
        return paths

    def evaluate(self, label: str, model_dir: str, adapter_dir: str | None = None,
                 split: str = "eval") -> dict[str, Any]:
        """Verifiable accuracy of a model (+ adapter) on the held-out problems (`split` "eval"),
        or on the gate's validation problems ("gate"); cached next to the run.

        Under accelerate the main process evaluates; the others read its cached result.
        """
        with main_process_first():
            result = self._evaluate(label, model_dir, adapter_dir, split)
        if split == "eval":
            self.evals[label] = result
        return result

    def _evaluate(self, label: str, model_dir: str, adapter_dir: str | None, split: str) -> dict[str, Any]:
        cache = self.run_dir / "evals" / (f"{label}.json" if split == "eval" else f"{split}/{label}.json")
        key = config_hash(model_dir, adapter_dir, dataclasses.asdict(self.settings.eval),
                          dataclasses.asdict(self.settings.task), self.settings.template,
                          self.records.get(label).hash if label in self.records else None,
                          *([] if split == "eval" else [split, dataclasses.asdict(self.settings.gate)]))
        if cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return data["result"]
        from ..data.files import load_data_file
        from ..evaluation import evaluate_saved_policy

        rows = load_data_file(self.paths[split])
        e = self.settings.eval
        result = evaluate_saved_policy(model_dir, rows, adapter_dir=adapter_dir,
                                       template=self.settings.template, reward_functions=e.reward_functions,
                                       max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                       stop_patterns=[e.stop_pattern] if e.stop_pattern else [],
                                       samples=e.samples_in_report, dtype=e.dtype)
        atomic_write_text(cache, json.dumps({"key": key, "result": result}, indent=2))
        logger.info("after %s: accuracy %.3f%s", label, result["accuracy"],
                    "" if split == "eval" else f" ({split} problems)")
        return result

    def gate(self, name: str, incumbent: tuple[str, str, str | None], candidate: tuple[str, str | None]) -> bool:
        """Whether stage `name`'s model (`candidate`: model, adapter) is kept over `incumbent`
        (label, model, adapter): both answer the gate's validation problems (gate.py)."""
        label, model, adapter = incumbent
        before = self.evaluate(label, model, adapter, split="gate")
        after = self.evaluate(name, *candidate, split="gate")
        verdict = {**decide(before["correct"], after["correct"], self.settings.gate.rule), "incumbent": label}
        logger.info("gate after %s: %.3f vs %s's %.3f on validation problems: %s", name,
                    verdict["candidate_accuracy"], label, verdict["incumbent_accuracy"],
                    "kept" if verdict["kept"] else "not kept")
        if verdict["kept"]:
            self.evaluate(name, *candidate)
            self.evals[name] = {**self.evals[name], "gate": verdict}
        else:  # the pipeline goes on with the incumbent: its held-out answers, marked so
            self.evals[name] = carried_eval(self.evals[label], verdict, label)
            if is_main_process():
                atomic_write_text(self.run_dir / "evals" / f"{name}.json",
                                  json.dumps({"key": None, "result": self.evals[name]}, indent=2))
        return verdict["kept"]

    def warn_requantizing(self, name: str, policy: str, quantization: Any) -> None:
        """Warn when stage `name` would load a policy an earlier stage produced in 4 bits."""
        from ..models import quant_settings

        quant = quant_settings(quantization)  # a section's mapping or QuantSettings, or None
        if quant is not None and quant.load_in_4bit and policy != self.base_model():
            logger.warning("%s: quantizing %s to 4 bits loses most of what the earlier stages taught "
                           "it (their change is small next to NF4's rounding); set `quantization: "
                           "null` in this section to train on it in full precision (docs/pipeline.md, "
                           "'Merging a QLoRA adapter')", name, policy)

    def stage_hash(self, name: str, section: Mapping[str, Any], upstream: str | None,
                   settings: Any = None) -> str:
        """The stage's hash: its section, upstream, the task and the versions of the plugins
        providing its components (an upgraded plugin reruns the stages that use it)."""
        from .resume import plugin_versions, settings_components

        versions = plugin_versions(settings_components(settings)) if settings is not None else {}
        section = {k: v for k, v in section.items() if k != "overwrite"}  # not what is trained
        return config_hash(name, section, upstream, dataclasses.asdict(self.settings.task), versions)

    # stage configs ------------------------------------------------------------------------
    def where(self, name: str) -> str:
        """How errors name stage `name`'s section."""
        return f"{self.config_label}: {name}" if self.config_label else name

    def context(self, name: str, policy: str, *, validating: bool = False) -> StageContext:
        """What stage `name` gets from the pipeline and the stages before it."""
        earlier = tuple(self.settings.stages[:self.settings.stages.index(name)]) if name in self.settings.stages else ()
        produced = [StageOutputs.from_dict(self.records[n].outputs) for n in earlier if n in self.records]
        reward_model = next((o.reward_model for o in reversed(produced) if o.reward_model), None)
        samples = next((o.samples for o in reversed(produced) if o.samples), None)
        if validating:  # what earlier stages will produce does not exist yet
            from ..protocols import member

            stages = registered_stages()
            reward_model = None
            samples = ("<samples of an earlier stage>"
                       if any("samples" in member(stages[n], "stages", "produces") for n in earlier)
                       else None)
        return StageContext(name=name, policy=policy, reward_model=reward_model, samples=samples,
                            data=self.paths, common=self.common(),
                            reward_functions=list(self.settings.eval.reward_functions),
                            section=self.settings.section(name), earlier=earlier, data_dir=self.data_dir,
                            validating=validating)

    def parse_section(self, name: str, ctx: StageContext, *,
                     static: bool = False) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """(merged section, our settings, TRL kwargs) of stage `name` in context `ctx`.

        While `ctx.validating`, upstream outputs are placeholders and artifacts that do not
        exist yet (the reward model) are left out, so every section can be checked before
        anything runs. `static`: TRL's fields are read from its source, not imported (seconds).
        """
        from ..protocols import member

        stage = registered_stages()[name]
        member(stage, "stages", "prepare")(ctx)
        data = deep_merge(member(stage, "stages", "defaults")(ctx), self.settings.section(name))
        settings, trl_kwargs = load_stage_config(data, stage.settings_class(),
                                                 member(stage, "stages", "config_class")(static),
                                                 where=self.where(name))
        quantized = member(stage, "stages", "policy_quantization")(settings)
        if not ctx.validating and quantized is not None:
            section, quantization = quantized
            self.warn_requantizing(section, ctx.policy, quantization)
        return data, settings, trl_kwargs

    def validate(self) -> None:
        """Check every selected stage's section (fields, types, plugins, options); no models, no files."""
        import tempfile

        from ..guard import check_model_ref, check_output_dir
        from ..protocols import member

        label = f"{self.config_label}: " if self.config_label else ""
        check_model_ref(self.settings.model, f"{label}model")  # before data is written or a model evaluated
        check_output_dir(self.run_dir, f"{label}output_dir")
        self.check_stage_folders()
        policy = "<policy of the previous stage>"
        self.paths = {key: f"<{key} data>" for key in DATA_FILES}
        stages = registered_stages()
        # every section parsed once, without importing TRL (fields, types, plugins: seconds) and
        # kept for the run; then the full checks (the real TRL configs)
        self.parsed = {}
        for name in self.settings.stages:
            ctx = self.context(name, policy, validating=True)
            _, settings, trl_kwargs = self.parse_section(name, ctx, static=True)
            model = getattr(settings, "model", None)
            if model is not None and model != policy:  # a section naming its own model
                check_model_ref(model, f"{self.where(name)}.model")
            _located_check(self.where(name), member(stages[name], "stages", "quick_check"), settings)
            self.parsed[name] = (ctx, settings, trl_kwargs)
        with tempfile.TemporaryDirectory() as scratch:
            for name, (_, settings, trl_kwargs) in self.parsed.items():
                _located_check(self.where(name), member(stages[name], "stages", "check"), settings,
                               trl_kwargs, Path(scratch) / name)

    def bind(self, name: str, ctx: StageContext) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """(merged section, settings, TRL kwargs) of stage `name` as parsed by `validate`, with
        what the earlier stages produced (`ctx`) in place of the placeholders it was checked with.

        Only the defaults that differ between the placeholder context and `ctx` (the incoming
        policy, the reward model, data written from earlier stages) are set; the section is not
        parsed again.
        """
        from ..protocols import member

        stage = registered_stages()[name]
        checked_ctx, settings, trl_kwargs = self.parsed[name]
        member(stage, "stages", "prepare")(ctx)
        section = self.settings.section(name)
        checked = deep_merge(member(stage, "stages", "defaults")(checked_ctx), section)
        data = deep_merge(member(stage, "stages", "defaults")(ctx), section)
        settings, trl_kwargs = copy.copy(settings), dict(trl_kwargs)
        for key, value in data.items():
            if key in checked and checked[key] == value:
                continue
            if key in trl_kwargs or not hasattr(settings, key):
                trl_kwargs[key] = value
            else:
                setattr(settings, key, value)
        quantized = member(stage, "stages", "policy_quantization")(settings)
        if quantized is not None:
            section_name, quantization = quantized
            self.warn_requantizing(section_name, ctx.policy, quantization)
        return data, settings, trl_kwargs

    def check_stage_folders(self) -> None:
        """ConfigError naming the entries of a selected stage's folder that no record of ours
        claims (nothing is removed on a guess); `overwrite` replaces them."""
        from .resume import unclaimed_entries, unclaimed_error

        for name in self.settings.stages:
            foreign = [] if self.settings.overwrite else unclaimed_entries(self.run_dir / name)
            if foreign:
                raise unclaimed_error(self.run_dir / name, foreign, self.where(name))

    def run_stage(self, name: str, policy: str, upstream: str | None) -> StageRecord:
        """Stage `name` on `policy`: skipped when its output is up to date, else run and recorded."""
        stage = registered_stages()[name]
        ctx = self.context(name, policy)
        data, settings, trl_kwargs = self.bind(name, ctx)

        def body(stage_dir: Path) -> StageRecord:
            result = stage.run(settings, trl_kwargs, stage_dir, ctx)
            return StageRecord(name, "", result.outputs.as_dict(), result.metrics,
                               result.log_history, result.components)
        return run_stage(name, self.run_dir / name, self.stage_hash(name, data, upstream, settings),
                         body, overwrite=self.settings.overwrite)

    # run --------------------------------------------------------------------------------
    def run(self) -> Path:
        """Run every configured stage; returns the report path."""
        from .. import registry

        self.validate()  # every section, before anything is written or loaded
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with main_process_first():
            self.paths = self.write_data()
        policy = self.base_model()
        self.evaluate("base", policy)
        kept: tuple[str, str, str | None] = ("base", policy, None)  # the model the pipeline holds
        upstream: str | None = config_hash(policy)
        for name in self.settings.stages:
            record = self.run_stage(name, policy, upstream)
            self.records[name] = record
            upstream = record.hash
            if not record.outputs.get("evaluate", True):
                continue
            candidate = (record.outputs.get("policy", policy), record.outputs.get("policy_adapter"))
            if name in self.settings.gate.stages and not self.gate(name, kept, candidate):
                continue  # not kept: later stages start from the incumbent
            if "policy" in record.outputs:
                policy = record.outputs["policy"]
            if name not in self.settings.gate.stages:
                self.evaluate(name, *candidate)
            kept = (name, *candidate)
        summary = {
            "config": self.config_label, "smoke": self.smoke,
            "evals": self.evals,
            "stages": {n: {**dataclasses.asdict(r)} for n, r in self.records.items()},
            "plugins": [p.as_dict() for p in registry().plugins],
        }
        if not is_main_process():
            return self.run_dir / "report.md"
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        return write_report(self.run_dir, summary)
