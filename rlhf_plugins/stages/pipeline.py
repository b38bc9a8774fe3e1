"""The whole pipeline in one command: SFT -> reward model -> rejection sampling -> PPO.

Each stage is run by its own stage module (they wire TRL); this module only orders them, passes
each stage the previous stage's output, evaluates held-out verifiable accuracy after every
stage, skips stages whose output is up to date (same config hash), resumes interrupted ones
from their last checkpoint, and writes the report.
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
from ..config import build_dataclass, config_hash, load_stage_config, load_yaml
from ..errors import ConfigError, RlhfPluginsError
from ..report import write_report
from .distributed import is_main_process, main_process_first
from .gate import GateSettings, carried_eval, check_gate, decide
from .stage_runs import DONE_FILE, STARTED_FILE, StageRecord, peak_memory_mb, run_stage  # noqa: F401
from .stage_specs import DATA_FILES, STAGE_SPECS, locate, pairs_from_samples

logger = logging.getLogger(__name__)

STAGES = ("sft", "reward_model", "rejection_sampling", "ppo")


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
    sft: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] = field(default_factory=dict)
    rejection_sampling: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    #: stages whose model is kept only when it beats its start on validation problems (gate.py)
    gate: GateSettings = field(default_factory=GateSettings)
    smoke: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; available: {list(STAGES)}")
        check_gate(self.gate, STAGES, [s for s in STAGES if STAGE_SPECS[s].policy_quantization],
                   self.task.eval_split)


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
    return build_dataclass(PipelineSettings, data, where)


# --- the stages ---------------------------------------------------------------------------


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
        self.s = settings
        self.run_dir = Path(settings.output_dir)
        self.data_dir = self.run_dir / "data"
        self.config_label = config_label
        self.smoke = smoke
        self.records: dict[str, StageRecord] = {}
        self.evals: dict[str, dict[str, Any]] = {}

    # shared pieces ------------------------------------------------------------------------
    def base_model(self) -> str:
        from ..models import resolve_model
        return resolve_model(self.s.model)

    def common(self) -> dict[str, Any]:
        """Fields every training stage inherits unless its section sets them."""
        out: dict[str, Any] = {"template": self.s.template, "seed": self.s.seed}
        if self.s.lora is not None:
            out["lora"] = self.s.lora
        if self.s.quantization is not None:
            out["quantization"] = self.s.quantization
        return out

    def write_data(self) -> dict[str, str]:
        """The synthetic task's datasets as JSONL under `run_dir/data` (deterministic)."""
        from ..data import synth

        t = self.s.task
        files: dict[str, tuple[str, Any]] = {
            "sft": ("sft_train.jsonl", synth.sft_rows(t.n_train, t.seed, "train")),
            "preference": ("preference_train.jsonl", synth.preference_rows(t.n_train, t.seed + 1, "train")),
            "preference_eval": (f"preference_{t.eval_split}.jsonl",
                                synth.preference_rows(t.n_eval, t.seed + 1, t.eval_split)),
            "rl": ("rl_train.jsonl", synth.rl_rows(t.n_train, t.seed + 2, "train")),
            "eval": (f"rl_{t.eval_split}.jsonl", synth.rl_rows(t.n_eval, t.seed, t.eval_split)),
        }
        if self.s.gate.stages:  # the gate's problems: validation, never the test split reported
            g = self.s.gate
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
        key = config_hash(model_dir, adapter_dir, dataclasses.asdict(self.s.eval),
                          dataclasses.asdict(self.s.task), self.s.template,
                          self.records.get(label).hash if label in self.records else None,
                          *([] if split == "eval" else [split, dataclasses.asdict(self.s.gate)]))
        if cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return data["result"]
        from ..evaluation import evaluate_saved_policy

        rows = [json.loads(line) for line in Path(self.paths[split]).read_text().splitlines()]
        e = self.s.eval
        result = evaluate_saved_policy(model_dir, rows, adapter_dir=adapter_dir,
                                       template=self.s.template, reward_functions=e.reward_functions,
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
        verdict = {**decide(before["correct"], after["correct"], self.s.gate.rule), "incumbent": label}
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
        return config_hash(name, section, upstream, dataclasses.asdict(self.s.task), versions)

    # stage configs ------------------------------------------------------------------------
    def stage_config(self, name: str, policy: str, *, validating: bool = False,
                     static: bool = False) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """(merged section, our settings, TRL kwargs) of stage `name` on `policy`.

        `validating`: upstream outputs are placeholders and artifacts that do not exist yet (the
        reward model) are left out, so every section can be checked before anything runs.
        `static`: TRL's fields are read from its source, not imported (a check in seconds).
        """
        spec = STAGE_SPECS[name]
        rm = self.records.get("reward_model")
        reward_model = rm.outputs["reward_model"] if rm else None
        if validating and "reward_model" in self.s.stages:
            reward_model = None
        defaults = spec.defaults(self, policy, reward_model)
        data = deep_merge(defaults, getattr(self.s, name))
        ours, trl_cls = spec.classes(static)
        where = f"{self.config_label}: {name}" if self.config_label else name
        settings, trl_kwargs = load_stage_config(data, ours, trl_cls, where=where)
        if not validating and spec.policy_quantization is not None:
            section, quantization = spec.policy_quantization(settings)
            self.warn_requantizing(section, policy, quantization)
        return data, settings, trl_kwargs

    def validate(self) -> None:
        """Check every selected stage's section (fields, types, plugins, options); no models, no files."""
        import tempfile

        from ..guard import check_model_ref, check_output_dir

        label = f"{self.config_label}: " if self.config_label else ""
        check_model_ref(self.s.model, f"{label}model")  # before data is written or a model evaluated
        check_output_dir(self.run_dir, f"{label}output_dir")
        policy = "<policy of the previous stage>"
        self.paths = {key: f"<{key} data>" for key in DATA_FILES}
        if pairs_from_samples(self.s.stages):
            self.paths.update(pairs_train="<on-policy pairs>", pairs_eval="<held-out on-policy pairs>")
        # first every section without importing TRL (fields, types, plugins: seconds), then the
        # full checks (the real TRL configs)
        for name in self.s.stages:
            _, settings, _ = self.stage_config(name, policy, validating=True, static=True)
            where = f"{self.config_label}: {name}" if self.config_label else name
            model = getattr(settings, "model", None)
            if model is not None and model != policy:  # a section naming its own model
                check_model_ref(model, f"{where}.model")
            _located_check(where, STAGE_SPECS[name].quick, settings)
        with tempfile.TemporaryDirectory() as scratch:
            for name in self.s.stages:
                _, settings, trl_kwargs = self.stage_config(name, policy, validating=True)
                where = f"{self.config_label}: {name}" if self.config_label else name
                _located_check(where, STAGE_SPECS[name].check, settings, trl_kwargs,
                               Path(scratch) / name)

    # stage bodies -------------------------------------------------------------------------
    def stage_sft(self, policy: str, upstream: str | None) -> StageRecord:
        """SFT from `policy` on the task's conversations; its merged model is the new policy."""
        from .sft import run_sft

        data, settings, trl_kwargs = self.stage_config("sft", policy)

        def body(stage_dir: Path) -> StageRecord:
            result = run_sft(settings, trl_kwargs, stage_dir)
            policy = str(result.merged_dir) if result.merged_dir else str(stage_dir)
            metrics = {k: v for k, v in result.metrics.items() if k != "log_history"}
            return StageRecord("sft", "", {"policy": policy}, metrics,
                               result.metrics.get("log_history", []),
                               {"template": settings.template, "masking": settings.masking})
        return run_stage("sft", self.run_dir / "sft", self.stage_hash("sft", data, upstream, settings), body)

    def stage_reward_model(self, policy: str, upstream: str | None) -> StageRecord:
        """A reward head (QLoRA adapter + head) on the current policy, from preference pairs."""
        from .reward import run_rm

        sampling = self.records.get("rejection_sampling")
        samples = sampling.outputs.get("samples") if sampling is not None else None
        if samples:  # rejection sampling ran first: pairs of its graded samples
            from ..data.verified_pairs import write_verified_pairs

            pairs = write_verified_pairs(samples, self.data_dir, seed=self.s.seed)
            if pairs is None:
                logger.warning("reward_model: rejection sampling left no prompt with both a passing "
                               "and a failing sample; training on the task's synthetic pairs")
            self.paths.update(pairs or {})
        data, settings, trl_kwargs = self.stage_config("reward_model", policy)

        def body(stage_dir: Path) -> StageRecord:
            result = run_rm(settings, trl_kwargs, stage_dir)
            metrics = _flat_metrics(result.metrics)
            return StageRecord("reward_model", "", {"reward_model": str(stage_dir), "evaluate": False},
                               metrics, result.metrics.get("log_history", []),
                               {"head": settings.head, "loss": settings.loss or "default",
                                "template": settings.template})
        return run_stage("reward_model", self.run_dir / "reward_model",
                         self.stage_hash("reward_model", data, upstream, settings), body)

    def stage_rejection_sampling(self, policy: str, upstream: str | None) -> StageRecord:
        """Sample N per prompt, score (verifier + reward model), select, SFT on the selection."""
        from .sampling import run_sampling

        data, settings, _ = self.stage_config("rejection_sampling", policy)

        def body(stage_dir: Path) -> StageRecord:
            result = run_sampling(settings, stage_dir)
            summary = result.summary
            metrics = {k: v for k, v in summary.items()
                       if isinstance(v, (int, float, str)) and k not in ("policy", "config_hash")}
            sft = result.sft
            outputs = {"policy": str(sft.merged_dir) if sft is not None and sft.merged_dir else policy}
            if (stage_dir / "all.jsonl").is_file():  # every graded sample (on-policy RM pairs)
                outputs["samples"] = str(stage_dir / "all.jsonl")
            history = sft.metrics.get("log_history", []) if sft is not None else []
            return StageRecord("rejection_sampling", "", outputs, metrics, history,
                               {"selection": settings.selection,
                                "reward_functions": [str(f) for f in settings.reward_functions],
                                "reward_model": bool(settings.reward_model)})
        return run_stage("rejection_sampling", self.run_dir / "rejection_sampling",
                         self.stage_hash("rejection_sampling", data, upstream, settings), body)

    def stage_ppo(self, policy: str, upstream: str | None) -> StageRecord:
        """Policy optimisation on one 4-bit base: LoRA policy, value head, reward adapter + verifier."""
        from .ppo import run_ppo

        data, settings, trl_kwargs = self.stage_config("ppo", policy)

        def body(stage_dir: Path) -> StageRecord:
            result = run_ppo(settings, trl_kwargs, stage_dir)
            outputs: dict[str, Any] = {"policy": policy}
            if result.adapter:
                outputs["policy_adapter"] = str(stage_dir)
            else:
                outputs["policy"] = str(stage_dir)
            return StageRecord("ppo", "", outputs, _flat_metrics(result.metrics),
                               result.metrics.get("log_history", []),
                               {"advantage_estimator": settings.advantage_estimator,
                                "reward_functions": [str(f) for f in settings.reward_functions],
                                "reward_adapter": bool(settings.reward_adapter),
                                "reward_model": bool(settings.reward_model),
                                "kl_penalty": settings.kl_penalty})
        return run_stage("ppo", self.run_dir / "ppo", self.stage_hash("ppo", data, upstream, settings), body)

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
        for name in self.s.stages:
            record = getattr(self, f"stage_{name}")(policy, upstream)
            self.records[name] = record
            upstream = record.hash
            if not record.outputs.get("evaluate", True):
                continue
            candidate = (record.outputs.get("policy", policy), record.outputs.get("policy_adapter"))
            if name in self.s.gate.stages and not self.gate(name, kept, candidate):
                continue  # not kept: later stages start from the incumbent
            if "policy" in record.outputs:
                policy = record.outputs["policy"]
            if name not in self.s.gate.stages:
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


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars of a metrics dict, nested dicts flattened as `outer.inner` (log history dropped)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "log_history":
            continue
        if isinstance(value, Mapping):
            for k, v in _flat_metrics(value).items():
                out[f"{key}.{k}"] = v
        elif isinstance(value, (int, float, str)) or value is None:
            out[key] = value
    return out
