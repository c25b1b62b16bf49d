"""Generated parts of ``docs/configuration.md`` (a test fails when the file is stale).

Regenerate with ``python -m moe_a2a.server_args.docs docs/configuration.md``. Each block sits between
``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``.
"""

from __future__ import annotations

import re
import sys
import warnings
from types import MappingProxyType
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from moe_a2a.server_args.errors import REMOVAL_RELEASE
from moe_a2a.server_args.fields import (
    FIELDS,
    FIELDS_BY_NAME,
    LEGACY_FLAGS,
    LEGACY_VARS,
    SGLANG_SPELLINGS,
    format_value,
)
from moe_a2a.server_args.model import ServerArgs
from moe_a2a.server_args.resolve import resolve


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_table() -> str:
    rows = ["| flag | aliases | type | default | env variable | meaning |",
            "|---|---|---|---|---|---|"]
    for f in FIELDS:
        neg = f" / `--no-{f.flag[2:]}`" if f.type is bool else ""
        aliases = ", ".join(f"`{a}`" for a in f.aliases) or ""
        rng = f" ({f.range_text})" if f.range_text else ""
        meaning = f.help + (f". Auto: {f.auto}" if f.auto else "")
        rows.append(f"| `{f.flag}`{neg} | {aliases} | {_cell(f.type_text)}{rng} | "
                    f"`{f.default_text()}` | `{f.env}` | {_cell(meaning)} |")
    for spelling in SGLANG_SPELLINGS:
        aliases = ", ".join(f"`{a}`" for a in spelling.aliases)
        rows.append(f"| `{spelling.flag}` | {aliases} | int | | | SGLang {spelling.version}: "
                    f"{_cell(spelling.meaning)} |")
    for legacy in LEGACY_FLAGS:
        rows.append(f"| `{legacy.flag}` | | bool | | | deprecated: {legacy.meaning}; removed in "
                    f"{REMOVAL_RELEASE} |")
    return "\n".join(rows)


def legacy_table() -> str:
    rows = ["| legacy name | type | replacement | meaning here | removed in |",
            "|---|---|---|---|---|"]
    for var in LEGACY_VARS:
        env = FIELDS_BY_NAME[var.field].env
        rows.append(f"| `{var.var}` | {var.type.__name__} | `{var.replacement}` (or `{env}`) | "
                    f"{var.meaning} | {REMOVAL_RELEASE} |")
    for flag in LEGACY_FLAGS:
        rows.append(f"| `{flag.flag}` | flag | `{flag.replacement}` | {flag.meaning} | "
                    f"{REMOVAL_RELEASE} |")
    return "\n".join(rows)


def _quiet_resolve(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> ServerArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(list(argv), env=dict(env or {}))


class LayoutRow(NamedTuple):
    """One example of the layout table."""

    tp: int
    dp: int
    ep: Optional[int]  # None: not given
    backend: str
    dp_attention: bool

    def argv(self) -> List[str]:
        argv = ["--moe-a2a-backend", self.backend, "--tp-size", str(self.tp),
                "--dp-size", str(self.dp)]
        if self.ep is not None:
            argv += ["--ep-size", str(self.ep)]
        if self.dp_attention:
            argv.append("--enable-dp-attention")
        return argv


LAYOUT_ROWS: Tuple[LayoutRow, ...] = (
    LayoutRow(8, 1, None, "none", False),
    LayoutRow(8, 1, 8, "none", False),
    LayoutRow(8, 8, None, "deepep", True),
    LayoutRow(4, 2, None, "alltoall", True),
    LayoutRow(4, 2, 2, "none", True),
    LayoutRow(8, 2, None, "deepep", True),
    LayoutRow(8, 1, None, "megamoe", False),
)


def layout_table() -> str:
    rows = ["| tp | dp | ep given | backend | DP attention | attn_dp | attn_tp | moe_tp | ep | "
            "gather (capture on) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for row in LAYOUT_ROWS:
        a = _quiet_resolve(row.argv() + ["--enable-return-routed-experts"])
        rows.append(f"| {row.tp} | {row.dp} | {row.ep if row.ep is not None else '-'} | "
                    f"{row.backend} | {'on' if row.dp_attention else 'off'} | {a.attn_dp_size} | "
                    f"{a.attn_tp_size} | {a.moe_tp_size} | {a.ep_size} | "
                    f"{a.routed_experts_gather} |")
    return "\n".join(rows)


RANK_EXAMPLE = ["--tp-size", "4", "--dp-size", "2", "--ep-size", "2", "--enable-dp-attention"]


def rank_table() -> str:
    a = _quiet_resolve(RANK_EXAMPLE)
    rows = [f"`{' '.join(RANK_EXAMPLE)}` (backend none):", "",
            "| rank | attn_dp_rank | attn_tp_rank | moe_ep_rank | moe_tp_rank |",
            "|---|---|---|---|---|"]
    for r in range(a.tp_size):
        rows.append(f"| {r} | {a.attn_dp_rank(r)} | {a.attn_tp_rank(r)} | {a.moe_ep_rank(r)} | "
                    f"{a.moe_tp_rank(r)} |")
    return "\n".join(rows)


class RuleExample(NamedTuple):
    """A rule and a run that shows it: the run's decisions on ``fields`` are printed, its
    other decisions named after them."""

    rule: str
    text: str
    argv: Tuple[str, ...]
    env: Mapping[str, str]
    fields: Tuple[str, ...]


def _rule(rule: str, text: str, argv: Sequence[str], fields: Sequence[str],
          env: Optional[Mapping[str, str]] = None) -> RuleExample:
    return RuleExample(rule=rule, text=text, argv=tuple(argv), env=dict(env or {}),
                       fields=tuple(fields))


RULE_EXAMPLES: Tuple[RuleExample, ...] = (
    _rule("1", "`--enable-deepep-waterfill` needs a backend with the `waterfill` feature "
               "(deepep, megamoe): without an explicit backend it selects the first built-in "
               "that has it (an explicit backend without it is an error); shared-experts fusion "
               "is enforced",
          ["--enable-deepep-waterfill", "--tp-size", "2"],
          ["moe_a2a_backend", "enforce_shared_experts_fusion"]),
    _rule("2", "the legacy megamoe variable selects megamoe unless a backend is given explicitly",
          ["--tp-size", "4"], ["moe_a2a_backend"], env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"}),
    _rule("3", "backends with ep_policy `tp` derive ep_size = tp_size (an explicit different "
               "`--ep-size` is an error)",
          ["--moe-a2a-backend", "megamoe", "--tp-size", "8"], ["ep_size"]),
    _rule("4", "a backend knob that was not given takes the backend's own default (its "
               "settings class): megamoe shares weights with its fallback unless "
               "`--[no-]mega-moe-fix-memory` or `SGLANG_OPT_FIX_MEGA_MOE_MEMORY` is set",
          ["--moe-a2a-backend", "megamoe"], ["mega_moe_fix_memory"]),
    _rule("5", "a backend mode that cannot be captured (deepep normal) turns CUDA graphs off "
               "(an explicit `--no-disable-cuda-graph` is an error)",
          ["--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--tp-size", "2"],
          ["disable_cuda_graph"]),
    _rule("6", "dp_size 1 turns DP attention off", ["--enable-dp-attention"],
          ["enable_dp_attention"]),
    _rule("7", "EPLB on: recorder mode `stat` and dispatch algorithm `static` when unset; EPLB "
               "needs ep_size > 1",
          ["--enable-eplb", "--tp-size", "4", "--ep-size", "4"],
          ["expert_distribution_recorder_mode", "ep_dispatch_algorithm"]),
    _rule("7", "... an initial expert location other than `trivial` sets dispatch algorithm "
               "`static` also without EPLB (as SGLang does)",
          ["--init-expert-location", '{"logical_count": [[5, 1, 1, 1]]}'],
          ["ep_dispatch_algorithm"]),
    _rule("7", "... and an active recorder keeps one rebalance period of steps: the buffer size "
               "follows `--eplb-rebalance-num-iterations` when unset (as SGLang does)",
          ["--expert-distribution-recorder-mode", "per_pass", "--eplb-rebalance-num-iterations",
           "500"], ["expert_distribution_recorder_buffer_size"]),
    _rule("8", "`--routed-experts-gather auto` resolves to `none` when no gather is needed",
          ["--tp-size", "4", "--enable-return-routed-experts"], ["routed_experts_gather"]),
    _rule("8", "... to `early` for a scattered layout with CUDA graphs on",
          ["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "4",
           "--enable-return-routed-experts"], ["routed_experts_gather"]),
    _rule("8", "... and to `late` for a scattered layout with CUDA graphs off",
          ["--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--tp-size", "4",
           "--enable-return-routed-experts"], ["routed_experts_gather"]),
)


def rules_section() -> str:
    out: List[str] = []
    for ex in RULE_EXAMPLES:
        a = _quiet_resolve(ex.argv, ex.env)
        prefix = " ".join(f"{k}={v}" for k, v in ex.env.items())
        cmd = " ".join(filter(None, [prefix, "moe-a2a config", " ".join(ex.argv)]))
        out.append(f"**Rule {ex.rule}.** {ex.text}. Example: `{cmd}`")
        out.append("")
        shown = [d for d in a.decisions if d.field in ex.fields]
        if not shown:  # the example no longer shows its rule: the doc would be wrong
            raise AssertionError(f"rule {ex.rule} example {ex.argv} made no decision on {ex.fields}")
        for d in shown:
            out.append(f"- `{d.field}`: `{format_value(d.from_)}` → `{format_value(d.to)}` — "
                       f"{d.reason}")
        others = [d.field for d in a.decisions if d.field not in ex.fields]
        if others:
            out.append(f"- (other decisions of this run: {', '.join(f'`{o}`' for o in others)})")
        out.append("")
    return "\n".join(out).rstrip()


# Rejected inputs and their messages (rule 9 and the other checks only ever reject).
ERROR_EXAMPLES: Tuple[Tuple[str, ...], ...] = (
    ("--moe-a2a-backend", "deepep", "--tp-size", "8", "--ep-size", "4"),
    ("--tp-size", "4", "--dp-size", "3", "--enable-dp-attention"),
    ("--enable-eplb",),
    ("--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2",
     "--cuda-graph-max-bs", "512"),
    ("--moe-a2a-backend", "megamoe", "--tp-size", "4", "--enable-dp-attention", "--dp-size", "2",
     "--cuda-graph-max-bs", "4096"),
    ("--disable-shared-experts-fusion", "--enforce-shared-experts-fusion"),
    ("--moe-a2a-backend", "mooncake"),
)


def errors_section() -> str:
    from moe_a2a.server_args.errors import ConfigError

    out: List[str] = []
    for argv in ERROR_EXAMPLES:
        try:
            _quiet_resolve(argv)
        except ConfigError as exc:
            out.append(f"- `moe-a2a config {' '.join(argv)}` → exit 2:  \n  `{exc}`")
        else:  # a doc example that no longer fails is a stale doc
            raise AssertionError(f"error example {argv} resolved without error")
    return "\n".join(out)


def sglang_vars_table() -> str:
    """The SGLang MoE variables moe-a2a reports as ignored."""
    from moe_a2a.server_args.sglang import UNUSED_SGLANG_VARS

    rows = ["| SGLang variable | what it does in SGLang | SGLang releases |", "|---|---|---|"]
    for var in UNUSED_SGLANG_VARS:
        rows.append(f"| `{var.name}` | {_cell(var.meaning)} | {', '.join(var.releases)} |")
    return "\n".join(rows)


# A DeepSeek-V3 launch line of the kind SGLang's docs give for DeepEP with DP attention and
# EPLB; everything after `python -m sglang.launch_server` goes to `moe-a2a config` unchanged.
SGLANG_EXAMPLE: Tuple[str, ...] = (
    "--model-path", "deepseek-ai/DeepSeek-V3", "--trust-remote-code", "--tp", "8",
    "--enable-dp-attention", "--dp", "8", "--moe-a2a-backend", "deepep", "--deepep-mode", "auto",
    "--chunked-prefill-size", "16384", "--cuda-graph-max-bs", "128", "--max-running-requests",
    "1024", "--enable-eplb", "--ep-num-redundant-experts", "32", "--mem-fraction-static", "0.8",
    "--enable-two-batch-overlap", "--host", "0.0.0.0", "--port", "30000")


def sglang_example() -> str:
    """The launch line through ``moe-a2a config``: what changed, what was checked, the warnings."""
    a = _quiet_resolve(SGLANG_EXAMPLE)
    given = {name for name, source in a.sources.items() if source.explicit}
    out = ["```bash", "moe-a2a config " + " ".join(SGLANG_EXAMPLE), "```", "",
           "| field | value | source |", "|---|---|---|"]
    for name, value in a.values().items():
        if name in given or a.sources[name].kind.value == "auto":
            out.append(f"| `{name}` | `{_cell(format_value(value))}` | {a.sources[name]} |")
    derived = a.derived()
    out += ["", f"Derived: attention-TP size {derived['attn_tp_size']}, prefill chunk "
                f"{derived['prefill_tokens_per_dp_rank']} tokens per DP rank "
                f"({derived['prefill_tokens_per_kernel_rank']} per kernel rank)."]
    for cap in a.capacities():
        out.append(f"Checked: `{cap['field']}` = {cap['capacity']} holds the largest "
                   f"{cap['batches']} batch, {cap['largest_batch_per_rank']} tokens per rank "
                   f"({cap['largest_batch_from']}).")
    out += ["", "Decisions:", ""]
    out += [f"- `{d.field}`: `{format_value(d.from_)}` → `{format_value(d.to)}` — {d.reason}"
            for d in a.decisions]
    out += ["", "Warnings:", ""] + [f"- {w}" for w in a.warnings]
    return "\n".join(out)


BLOCKS: Mapping[str, Callable[[], str]] = MappingProxyType({
    "errors": errors_section,
    "flags": flags_table,
    "legacy": legacy_table,
    "rules": rules_section,
    "layout": layout_table,
    "ranks": rank_table,
    "sglangvars": sglang_vars_table,
    "sglangexample": sglang_example,
})

_BLOCK_RE = re.compile(
    r"(<!-- BEGIN generated:(?P<name>[a-z]+) -->\n)(?P<body>.*?)\n?(<!-- END generated:(?P=name) -->)",
    re.S,
)


def update(text: str) -> str:
    """``text`` with every generated block replaced by its current content.

    Generated from moe-a2a's own backends only: backends of installed plugins never reach the
    docs (the registry is narrowed to the built-ins meanwhile)."""
    from moe_a2a.backends import registry_snapshot

    def replace(match: "re.Match[str]") -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + BLOCKS[name]() + "\n" + match.group(4)

    with registry_snapshot(builtins_only=True):
        return _BLOCK_RE.sub(replace, text)


def block_names(text: str) -> List[str]:
    return [m.group("name") for m in _BLOCK_RE.finditer(text)]


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m moe_a2a.server_args.docs docs/configuration.md", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        text = fh.read()
    new = update(text)
    if new != text:
        with open(argv[0], "w", encoding="utf-8") as fh:
            fh.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
