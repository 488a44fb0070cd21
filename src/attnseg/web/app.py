"""The web page of ``attnseg serve``: upload an image (or pick an example), choose a method and its main
parameters, see the overlay and per-class heatmaps, download the label PNG and the JSON.

Everything runs locally: Gradio's analytics are off, no share link is made, and the page uses system fonts
(no font is fetched from the internet). Requests are queued and run one at a time on the loaded model.

The work is done by :func:`segment_request`, a plain function (testable without a browser); :func:`build_app`
lays the page out around it.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

from attnseg.errors import AttnSegError, ConfigError
from attnseg.io.geometry import FITS
from attnseg.web import example_images

if TYPE_CHECKING:
    import gradio as gr

    from attnseg.models.base import DiffusionAdapter

__all__ = ["METHODS", "RequestOutput", "build_app", "launch", "segment_request"]

#: the methods on the page, with what each needs
METHODS = ("diffseg", "goca", "target", "clustering")


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced (paths under the request's own folder)."""

    overlay: Path
    labels: Path
    json: Path
    heatmaps: list[tuple[Path, str]] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    def legend_html(self) -> str:
        """Colour chips with the segment names, in the overlay's colours."""
        from html import escape

        from attnseg.io.export import palette

        cols = palette(max(self.ids, default=0) + 1)
        chip = "display:inline-block;width:14px;height:14px;vertical-align:middle;border:1px solid #333"
        chips = "".join(
            f'<span style="display:inline-block;margin:2px 10px 2px 0"><span style="{chip};'
            f'background:rgb{tuple(int(c) for c in cols[i])}"></span> {escape(name)}</span>'
            for i, name in zip(self.ids, self.legend, strict=True)
        )
        return f'<div id="legend-chips">{chips}</div>'

    def status(self, method: str) -> str:
        h, w = self.size
        names = ", ".join(self.legend) if self.legend else "-"
        return (f"{method}: {len(self.legend)} segment(s) on a {w}x{h} image in {self.seconds:.1f} s. "
                f"Segments: {names}")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be whole numbers separated by commas, e.g. 2, 5, 10; got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} must name at least one value, e.g. 2, 5, 10")
    return values


def family_defaults(adapter: DiffusionAdapter, method: str) -> dict[str, Any]:
    """The hyper-parameters ``method`` runs with on ``adapter`` when the page sets none (the family preset)."""
    from attnseg.presets import resolve_settings

    return resolve_settings(method, adapter).params


def method_settings(
    adapter: DiffusionAdapter, method: str, *, classes: str = "", target: str = "", prompt: str = "",
    ks: str = "", kl_threshold: float | None = None, background_threshold: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method hyper-parameters, run options)`` the page sets for ``method``; the pipeline puts them over the
    model family's settings (:func:`attnseg.presets.resolve_settings`)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    params: dict[str, Any] = {}
    run: dict[str, Any] = {}
    prompt = (prompt or "").strip()
    if method == "diffseg":
        if kl_threshold is not None:  # one threshold per resolution, as many as the family's (or DiffSeg's) list
            n = len(family_defaults(adapter, "diffseg").get("kl_thresholds", (1.1, 1.1, 1.1)))
            params["kl_thresholds"] = (float(kl_threshold),) * n
        if prompt:
            run["prompt"] = prompt
    elif method == "goca":
        names = [c.strip() for c in (classes or "").split(",") if c.strip()]
        if not names:
            raise ConfigError("GoCA needs class names: type them in 'Classes', e.g. circle, square")
        params["classes"] = tuple(names)
        if background_threshold is not None:
            params["background_threshold"] = float(background_threshold)
        if prompt:
            params["prompt"] = prompt
    elif method == "target":
        word = (target or "").strip()
        if not word:
            raise ConfigError("the target method needs a word to segment: type it in 'Target word', e.g. circle")
        params["target"] = word
        if prompt:
            params["prompt"] = prompt
    else:
        params["ks"] = _ints(ks or "2, 3, 5", "k values")
        if prompt:
            run["prompt"] = prompt
    return params, run


def segment_request(
    adapter: DiffusionAdapter, image: str | Path | None, method: str, *, workdir: Path, fit: str = "pad",
    seed: int = 0, **settings: Any,
) -> RequestOutput:
    """Segment one uploaded image and write its outputs (at the image's own size) to a new folder in ``workdir``.

    Raises:
        AttnSegError: a bad input, with a message for the page.
    """
    from attnseg.cli.segment import write_output
    from attnseg.io.geometry import check_fit
    from attnseg.pipeline import AttentionSegmentationPipeline

    if image is None or not str(image):
        raise ConfigError("no image: upload one, or pick an example below")
    fit_choice = check_fit(fit)
    params, run = method_settings(adapter, method, **settings)
    pipe = AttentionSegmentationPipeline(adapter, method, fit=fit_choice, **params)  # the family's settings below
    seg = pipe.method
    if fit_choice == "native" and getattr(seg, "square_grids", False):
        raise ConfigError(f"fit 'native' gives inputs of the image's shape, but {method} needs square attention "
                          "grids: choose pad")
    start = time.perf_counter()
    output = pipe.run(image, seed=int(seed), **run)
    out = Path(tempfile.mkdtemp(prefix="request-", dir=workdir))
    stem = Path(str(image)).stem or "image"
    written = write_output(output, out, stem, heatmaps=True, pca_rgb=False, method=seg)
    result = output.model_result
    present = sorted(set(result.labels.unique().tolist()))
    names = result.label_names
    legend = [names[i] if names is not None and i < len(names) else f"segment {i}" for i in present]
    heatmaps = [(Path(p), key.split(":", 1)[1]) for key, p in written.items() if key.startswith("heatmap:")]
    heatmaps += [(Path(p), f"k = {key.split(':k', 1)[1]}") for key, p in written.items()
                 if key.startswith("overlay:k")]
    return RequestOutput(overlay=written["overlay"], labels=written["labels"], json=written["json"],
                         heatmaps=heatmaps, legend=legend, ids=present, size=output.size,
                         seconds=time.perf_counter() - start)


def model_banner(adapter: DiffusionAdapter, name: str) -> str:
    from attnseg.cli.common import model_banner as banner

    return banner(adapter, name)


def build_app(adapter: DiffusionAdapter, model_name: str, *, workdir: Path | None = None) -> gr.Blocks:
    """The page, bound to a loaded model; outputs go to ``workdir`` (default: a new temporary folder)."""
    import gradio as gr

    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="attnseg-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kl_default = float(family_defaults(adapter, "diffseg").get("kl_thresholds", (1.1,))[0])
    bg_default = float(family_defaults(adapter, "goca").get("background_threshold", 0.5))
    toy = getattr(adapter, "family", "") in ("toyworld", "toyworld-flux")

    def run(image: str | None, method: str, classes: str, target: str, prompt: str, ks: str, kl: float,
            background: float, fit: str, seed: float) -> tuple[Any, ...]:
        try:
            out = segment_request(
                adapter, image, method, workdir=workdir, fit=fit, seed=int(seed or 0), classes=classes,
                target=target, prompt=prompt, ks=ks, kl_threshold=kl, background_threshold=background,
            )
        except AttnSegError as exc:
            message = f"**Error:** {exc}"
            return (None, "", [], gr.update(value=None, interactive=False),
                    gr.update(value=None, interactive=False), message)
        gallery = [(str(p), caption) for p, caption in out.heatmaps]
        return (str(out.overlay), out.legend_html(), gallery, gr.update(value=str(out.labels), interactive=True),
                gr.update(value=str(out.json), interactive=True), out.status(method))

    with gr.Blocks(title="attnseg", analytics_enabled=False) as demo:
        gr.Markdown(
            "## attnseg: segmentation from a diffusion model's attention\n"
            f"**{model_banner(adapter, model_name)}**"
            + ("\n\nTry the examples below: photographs mean nothing to this model." if toy else "")
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=320,
                                 elem_id="input-image")
                method = gr.Radio(list(METHODS), value="diffseg", label="Method", elem_id="method")
                with gr.Accordion("Parameters", open=True):
                    classes = gr.Textbox(label="Classes (goca)", placeholder="circle, square, triangle",
                                         value="circle, square, triangle" if toy else "", elem_id="classes")
                    target = gr.Textbox(label="Target word (target)", value="circle" if toy else "hair",
                                        elem_id="target")
                    prompt = gr.Textbox(label="Prompt (optional; goca and target build one from their words)",
                                        elem_id="prompt")
                    ks = gr.Textbox(label="k values (clustering)", value="2, 3, 5", elem_id="ks")
                    kl = gr.Slider(0.05, 3.0, value=kl_default, step=0.05, label="KL threshold (diffseg)",
                                   elem_id="kl")
                    background = gr.Slider(-1.0, 1.0, value=bg_default, step=0.05,
                                           label="Background threshold (goca)", elem_id="background")
                    fit = gr.Radio(list(FITS), value="pad", label="Fit (pad keeps the whole image)", elem_id="fit")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                status = gr.Markdown("Upload an image or pick an example, then press Segment.", elem_id="status")
                overlay = gr.Image(label="Overlay", type="filepath", interactive=False, elem_id="overlay",
                                   format="png", height=360)
                legend = gr.HTML(elem_id="legend")
                heatmaps = gr.Gallery(label="Per-class heatmaps (clustering: one overlay per k)", columns=3,
                                      height=240, elem_id="heatmaps")
                with gr.Row():
                    labels = gr.DownloadButton("Download labels (PNG)", interactive=False, elem_id="download-labels")
                    summary = gr.DownloadButton("Download JSON", interactive=False, elem_id="download-json")
        examples = [str(p) for p in example_images()]
        if examples:
            gr.Examples(examples=examples, inputs=[image], label="Examples")
        button.click(run, inputs=[image, method, classes, target, prompt, ks, kl, background, fit, seed],
                     outputs=[overlay, legend, heatmaps, labels, summary, status], concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.attnseg_workdir = workdir  # type: ignore[attr-defined]
    return demo


def launch(
    adapter: DiffusionAdapter, model_name: str, *, host: str = "127.0.0.1", port: int = 7860,
    block: bool = True, workdir: Path | None = None,
) -> Any:
    """Start the page; returns the Gradio app (``block=False`` returns at once, with the server running)."""
    import gradio as gr

    demo = build_app(adapter, model_name, workdir=workdir)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
        allowed_paths=[str(demo.attnseg_workdir)], theme=theme, show_error=True, quiet=True,  # type: ignore[attr-defined]
    )
    return demo
