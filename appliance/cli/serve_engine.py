"""``appliance serve-engine``: the embedded engine as a vLLM-protocol serving replica.

It answers what the appliance's vLLM client uses of ``vllm serve --enable-lora``
(runtime LoRA loading from a directory, ``/v1/models``, chat and completions,
streamed or not), so ``APPLIANCE_SERVING_ENGINE=vllm`` can drive CPU hosts or
small GPUs, or tests, exactly as it drives vLLM. Like vLLM, it reads adapters
from the private tmpfs directories the appliance writes: run it on the same host,
as the same user.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("serve-engine", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--served-model-name", "name", default=None,
              help="Name of the base model in requests [default: MODEL_DIR's name, as in the catalogue].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-cpu-loras", "max_loras", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most adapters loaded at once (keep >= APPLIANCE_MAX_RESIDENT_ADAPTERS).")
@click.option("--max-lora-rank", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--api-key-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="File holding the bearer token every /v1 request must carry (APPLIANCE_VLLM_API_KEY_FILE).")
def serve_engine_command(model_dir: Path, name: str | None, host: str, port: int, device: str, max_loras: int,
                         max_lora_rank: int, api_key_file: Path | None) -> None:
    """Serve MODEL_DIR with the embedded engine behind vLLM's OpenAI protocol (a serving replica)."""
    import uvicorn

    from serving.registry import EngineSpec, create_engine
    from serving.vllm_server import create_vllm_compatible_app

    api_key = api_key_file.read_text().strip() if api_key_file else None
    if api_key_file is not None and not api_key:
        raise click.BadParameter(f"{str(api_key_file)!r} is empty", param_hint="--api-key-file")
    engine = create_engine("transformers", EngineSpec(
        model_dir, name=name or model_dir.resolve().name, device=None if device == "auto" else device,
        max_resident_adapters=max_loras, max_lora_rank=max_lora_rank))
    app = create_vllm_compatible_app(engine, api_key=api_key, max_cpu_loras=max_loras)
    click.echo(f"serving {engine.base_model_name} (vLLM protocol) on http://{host}:{port}")
    sys.stdout.flush()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
    finally:
        engine.close()
