"""``moe-a2a doctor [--json]``: what this machine can run, and the real reason when not.

Reports torch (version, CUDA build, NCCL, distributed backends), the GPUs (name, compute
capability, memory, SMs) and how they are linked (peer access from torch; NVLink from NVML
when ``pynvml`` is installed; ``nvidia-smi topo -m`` when present), the kernel packages
(``deep_ep``, ``deep_gemm``: importable, version, the import error; NVSHMEM's wheel version),
and every registered backend's availability with its reason. Every probe is guarded: a
broken driver or package shows up as text, never as a crash. Exit status 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

from moe_a2a.plugins import add_plugin_argument

KERNEL_PACKAGES = ("deep_ep", "deep_gemm")
NVSHMEM_DISTRIBUTIONS = ("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12", "nvshmem")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="check this machine: torch, CUDA, NCCL, GPUs and links, kernel packages, "
                       "and why each backend can or cannot run",
        description="Environment preflight: torch and CUDA, NCCL, GPUs with their compute "
                    "capability and links, deep_ep / deep_gemm / NVSHMEM versions, and each "
                    "registered backend's availability with the real reason. Exit 0.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plugin_argument(p)
    p.set_defaults(handler=main)
    return p


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def probe_torch() -> Dict[str, Any]:
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:
        return {"importable": False, "error": _error(exc)}
    out: Dict[str, Any] = {"importable": True, "version": torch.__version__,
                           "cuda_build": torch.version.cuda}
    try:
        nccl = torch.cuda.nccl.version() if torch.version.cuda else None
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    except Exception as exc:
        out["nccl"] = None
        out["nccl_error"] = _error(exc)
    out["distributed"] = {"available": dist.is_available(),
                          "gloo": dist.is_available() and dist.is_gloo_available(),
                          "nccl": dist.is_available() and dist.is_nccl_available()}
    return out


def probe_cuda() -> Dict[str, Any]:
    try:
        import torch
    except Exception as exc:
        return {"available": False, "reason": f"import torch failed: {_error(exc)}"}
    try:
        available = torch.cuda.is_available()
    except Exception as exc:
        return {"available": False, "reason": f"torch.cuda.is_available() raised {_error(exc)}"}
    if not available:
        build = torch.version.cuda
        return {"available": False,
                "reason": f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                          f"{'built with CUDA ' + build if build else 'a CPU-only build'})"}
    out: Dict[str, Any] = {"available": True, "device_count": torch.cuda.device_count(), "gpus": []}
    for i in range(out["device_count"]):
        try:
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": props.name,
                                "compute_capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1),
                                "multiprocessors": props.multi_processor_count})
        except Exception as exc:
            out["gpus"].append({"index": i, "error": _error(exc)})
    out["links"] = probe_links(out["device_count"])
    return out


def probe_links(count: int) -> Dict[str, Any]:
    """Peer access between GPUs (torch), NVLink per GPU (NVML), ``nvidia-smi topo -m``."""
    import torch

    links: Dict[str, Any] = {}
    try:
        links["peer_access"] = [[i == j or bool(torch.cuda.can_device_access_peer(i, j))
                                 for j in range(count)] for i in range(count)]
    except Exception as exc:
        links["peer_access_error"] = _error(exc)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            active = []
            for i in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                n = 0
                for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                    try:
                        n += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == 1)
                    except Exception:
                        break
                active.append(n)
            links["nvlink_active_links"] = active
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        links["nvlink_active_links"] = "pynvml not installed (pip install nvidia-ml-py)"
    except Exception as exc:
        links["nvlink_error"] = _error(exc)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=20)
            text = done.stdout.strip() or done.stderr.strip()
            links["nvidia_smi_topo"] = re.sub(r"\x1b\[[0-9;]*m", "", text)  # no terminal styling
        except Exception as exc:
            links["nvidia_smi_topo"] = f"nvidia-smi topo -m failed: {_error(exc)}"
    return links


def probe_packages() -> Dict[str, Any]:
    from moe_a2a.dispatchers.kernels import emulation_info

    out: Dict[str, Any] = {}
    for name in KERNEL_PACKAGES:
        entry: Dict[str, Any] = {"version": _version(name) or _version(name.replace("_", "-"))}
        try:
            module = importlib.import_module(name)
            entry["importable"] = True
            entry["emulated"] = emulation_info(module) is not None
            entry.setdefault("version", None)
            if entry["version"] is None:
                entry["version"] = getattr(module, "__version__", None)
        except BaseException as exc:  # a broken CUDA build can raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry["importable"] = False
            entry["error"] = f"import {name} failed: {_error(exc)}"
        out[name] = entry
    sgl = _version("sgl-deep-gemm") or _version("sgl_deep_gemm")
    if sgl:
        out["deep_gemm"]["sgl_deep_gemm"] = sgl
    nvshmem = {dist: v for dist in NVSHMEM_DISTRIBUTIONS if (v := _version(dist))}
    out["nvshmem"] = nvshmem or ("no NVSHMEM wheel found (a source build linked into deep_ep "
                                 "does not show here)")
    return out


def probe_backends() -> List[Dict[str, Any]]:
    from moe_a2a import backends

    rows = []
    for row in backends.available_backends():
        rows.append({"name": row.name, "available": row.ok, "emulated": row.emulated,
                     "reason": row.reason})
    return rows


def collect() -> Dict[str, Any]:
    """Everything ``moe-a2a doctor`` reports, as one JSON-ready object."""
    from moe_a2a import __version__

    return {"moe_a2a": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch": probe_torch(), "cuda": probe_cuda(),
            "packages": probe_packages(), "backends": probe_backends()}


def render(report: Dict[str, Any]) -> str:
    lines = [f"moe-a2a {report['moe_a2a']} on Python {report['python']} ({report['platform']})", ""]
    t = report["torch"]
    if t.get("importable"):
        d = t["distributed"]
        lines.append(f"torch {t['version']}: CUDA build {t['cuda_build'] or 'none (CPU-only)'}, "
                     f"NCCL {t.get('nccl') or 'none'}; distributed: gloo "
                     f"{'yes' if d['gloo'] else 'no'}, nccl {'yes' if d['nccl'] else 'no'}")
    else:
        lines.append(f"torch: {t['error']}")
    c = report["cuda"]
    if not c["available"]:
        lines.append(f"CUDA: not available: {c['reason']}")
    else:
        lines.append(f"CUDA: {c['device_count']} GPU(s)")
        for g in c["gpus"]:
            lines.append(f"  cuda:{g['index']}: " + (g.get("error") or
                         f"{g['name']}, compute capability {g['compute_capability']}, "
                         f"{g['memory_gib']} GiB, {g['multiprocessors']} SMs"))
        links = c.get("links", {})
        if "peer_access" in links:
            lines.append("  peer access: " + " ".join(
                "".join("x" if ok else "." for ok in row) for row in links["peer_access"]))
        if "nvlink_active_links" in links:
            lines.append(f"  NVLink active links per GPU: {links['nvlink_active_links']}")
        if "nvidia_smi_topo" in links:
            lines.append("  nvidia-smi topo -m:")
            lines.extend("    " + line for line in links["nvidia_smi_topo"].splitlines())
    lines.append("")
    for name, entry in report["packages"].items():
        if name == "nvshmem":
            text = entry if isinstance(entry, str) else ", ".join(f"{k} {v}" for k, v in entry.items())
            lines.append(f"nvshmem: {text}")
        elif entry["importable"]:
            how = "moe-a2a emulation" if entry.get("emulated") else "installed"
            lines.append(f"{name}: {how}, version {entry.get('version') or 'unknown'}")
        else:
            lines.append(f"{name}: {entry['error']}")
    lines += ["", "backends:"]
    for row in report["backends"]:
        state = "emulated" if row["available"] and row["emulated"] else \
            "available" if row["available"] else "unavailable"
        lines.append(f"  {row['name']}: {state}" + (f": {row['reason']}" if row["reason"] else ""))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    sys.stdout.flush()
    return 0


__all__ = ["collect", "render"]
