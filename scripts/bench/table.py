"""Results: the samples of every figure, and the markdown table made of them.

Every cell is the median of the runs with their spread, `median (min–max)`;
a ratio is taken between medians. "not supported" says why medboxd could not
produce a figure; "—" marks a figure that has no such side.
"""

import statistics

class Figure:
    """The samples of one measured quantity, or why there are none."""

    def __init__(self, unit, higher_is_better=True):
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.samples = []
        self.missing = None  # e.g. "not supported [1]" when no sample could be taken

    @property
    def median(self):
        return statistics.median(self.samples) if self.samples else None

    def spread(self):
        """(max - min) / median, the relative spread of the runs."""
        if len(self.samples) < 2 or not self.median:
            return None
        return (max(self.samples) - min(self.samples)) / abs(self.median)

    def cell(self):
        if not self.samples:
            return self.missing or "—"
        digits = decimals(self.median)
        text = f"{self.median:.{digits}f}"
        if len(self.samples) > 1:
            text += f" ({min(self.samples):.{digits}f}–{max(self.samples):.{digits}f})"
        return text


def decimals(value):
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3


class Results:
    """Figures by (side, dtype, key); side is "medbox" or "hf"."""

    def __init__(self):
        self.figures = {}
        self.unservable = {}  # dtype: the cell saying medboxd could not serve the model in it
        self.notes = []       # the reasons the cells point to, as [1], [2], ...

    def note(self, text):
        """The marker of a note below the table ("[n]"), the same for the same text."""
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def figure(self, side, dtype, key, unit, higher_is_better=True):
        return self.figures.setdefault((side, dtype, key), Figure(unit, higher_is_better))

    def get(self, side, dtype, key):
        return self.figures.get((side, dtype, key))

    def largest_spread(self):
        spreads = [(figure.spread(), key) for key, figure in self.figures.items() if figure.spread() is not None]
        return max(spreads, default=(None, None))


def speedup(medbox, reference):
    """medbox's advantage as a factor (> 1: medbox better), from the medians."""
    if medbox is None or reference is None or medbox.median is None or reference.median is None:
        return "—"
    if medbox.higher_is_better:
        value = medbox.median / reference.median
    else:
        value = reference.median / medbox.median
    return f"{value:.2f}×"


def percent(value):
    return "—" if value is None else f"{100 * value:.0f}%"


def render(header_lines, rows, notes=()):
    """rows: (figure, dtype, medbox cell, hf cell, ratio, target) tuples;
    notes: the texts of the cells' [1], [2], ..."""
    lines = list(header_lines)
    lines.append("")
    lines.append("| figure | dtype | medbox | HF transformers | medbox ÷ HF | target |")
    lines.append("|---|---|---|---|---|---|")
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    if notes:
        lines.append("")
        lines.extend(f"[{number}] {text}" for number, text in enumerate(notes, 1))
    return "\n".join(lines) + "\n"


# -- the rows of one dtype ----------------------------------------------------

def dtype_rows(results, dtype, hf_dtype, new_tokens, bound, reference_elsewhere):
    """The table rows of one medbox dtype against the reference in hf_dtype
    (the same dtype, or f32 where transformers has no such one).
    bound: {"bytes": weight bytes per token of dtype and of hf_dtype, "gbps": read GB/s}.
    reference_elsewhere: the reference's figures have rows of their own in the table."""
    if dtype in results.unservable and reference_elsewhere:
        # Nothing of this dtype was measured: the reference's rows are elsewhere.
        return [("every figure", dtype, results.unservable[dtype], "—", "—", "—"),
                bandwidth_rows(None, None, dtype, hf_dtype, f"{hf_dtype}: ", bound)[0]]
    medbox = lambda key: results.get("medbox", dtype, key)  # noqa: E731
    hf = lambda key: results.get("hf", hf_dtype, key)  # noqa: E731
    tag = "" if hf_dtype == dtype else f"{hf_dtype}: "

    def cells(key):
        return medbox_cell(medbox(key)), hf_cell(hf(key), tag), speedup(medbox(key), hf(key))

    fast = "≥ 2× HF f32 if the fast dtype (llama.cpp Q8_0: ~3×)"
    rows = [("decode, 1 stream (tok/s)", dtype, *cells("decode"),
             {"f32": "≥ 1.1×"}.get(dtype, fast if hf_dtype != dtype else "—"))]
    if hf_dtype == dtype and dtype != "f32":
        f32 = results.get("hf", "f32", "decode")
        rows.append(("decode, 1 stream, against HF f32 (tok/s)", dtype, medbox_cell(medbox("decode")),
                     hf_cell(f32, "f32: "), speedup(medbox("decode"), f32), fast))
    rows.append((f"end to end, 1 stream, {new_tokens} tokens (tok/s)", dtype, *cells("end_to_end"), "—"))
    same_dtype = "≥ 1×" if hf_dtype == dtype else "—"
    rows.append(("time to first token, 512-token prompt (ms)", dtype, *cells("ttft_512"), same_dtype))
    rows.append(("prefill, 512-token prompt (tok/s)", dtype, *cells("prefill_512"), same_dtype))
    stream_keys = {k for (_, d, k) in results.figures if d == dtype and k.startswith("streams_")}
    for key in sorted(stream_keys, key=lambda k: int(k.split("_")[1])):
        count = int(key.split("_")[1])
        target = "—"
        if count == 32:
            target = {"bf16": "≥ 1.5×", "f32": "report (issue: ≥ 1.5×)"}.get(dtype, "—")
        rows.append((f"total, {count} streams, prompt 64 (tok/s)", dtype, *cells(key), target))
    rows.append(("time to first token, 1st request: 1,000-token prefix + 8 (ms)", dtype,
                 *cells("prefix_first"), "—"))
    rows.append(("time to first token, 2nd request sharing that prefix (ms)", dtype,
                 *cells("prefix_second"), "—"))
    rows.append(("2nd request's time to first token ÷ 1st's (%)", dtype, medbox_cell(medbox("prefix_share")),
                 hf_cell(hf("prefix_share"), tag), "—", "≤ 25%"))
    rows.append(json_row(medbox("json_decode"), medbox("decode"), dtype))
    rows.extend(bandwidth_rows(medbox("decode"), hf("decode"), dtype, hf_dtype, tag, bound))
    return rows


def medbox_cell(figure):
    return figure.cell() if figure is not None else "—"


def hf_cell(figure, tag=""):
    if figure is None:
        return "—"
    return tag + figure.cell() if figure.samples else figure.cell()


def json_row(constrained, unconstrained, dtype):
    ratio = "—"
    if constrained is not None and constrained.samples and unconstrained is not None and unconstrained.samples:
        ratio = f"{constrained.median / unconstrained.median:.2f}× unconstrained"
    return ("decode, 1 stream, JSON-schema constraint (tok/s)", dtype, medbox_cell(constrained),
            "— (no constraint)", ratio, "≥ 0.9× unconstrained")


def bandwidth_rows(medbox_decode, hf_decode, dtype, hf_dtype, tag, bound):
    gbps = bound["gbps"]
    limit = {d: gbps * 1e9 / bound["bytes"][d] for d in (dtype, hf_dtype)}

    def described(d):
        return f"{tag if d != dtype else ''}{limit[d]:.0f} ({bound['bytes'][d] / 1e6:.0f} MB/token)"

    def fraction(figure, d):
        if figure is None or not figure.samples:
            return "—"
        return f"{tag if d != dtype else ''}{percent(figure.median / limit[d])}"

    return [
        (f"bandwidth bound at {gbps:.1f} GB/s read (tok/s)", dtype, described(dtype), described(hf_dtype), "—", "—"),
        ("fraction of the bound, 1 stream", dtype, fraction(medbox_decode, dtype), fraction(hf_decode, hf_dtype),
         "—", "report; ≥ 60% for the fast dtype"),
    ]
