import pytest
import torch
from transformers import AutoModelForCausalLM

from appliance.training.data import IGNORE_INDEX, tokenize_records
from appliance.training.packing import PACKED_ATTENTION, linear_cross_entropy, pack, packed_loss_sum, packed_token_losses

from .conftest import reverse_records


def test_packing_gives_each_example_its_unpacked_loss(tiny_model_dir, tokenizer):
    records = reverse_records(6, seed=1) + [{"text": "hello world " * 5}, {"prompt": "Capital?", "completion": " Paris"}]
    examples = tokenize_records(records, tokenizer, param="r")
    batch = pack(examples)
    assert batch.input_ids.shape == (1, sum(len(e) for e in examples)) == (1, batch.n_tokens)

    # Ours runs attention per example; stock sdpa/eager isolate examples by the position-id restarts.
    for attn in (PACKED_ATTENTION, "sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, local_files_only=True)
        losses, owner = packed_token_losses(model, batch)
        for i, example in enumerate(examples):
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            with torch.no_grad():
                reference = model(input_ids=ids, labels=labels).loss
            torch.testing.assert_close(losses[owner == i].mean(), reference, rtol=1e-5, atol=1e-5)


def test_targets_never_cross_example_boundaries(tokenizer):
    examples = tokenize_records([{"text": "a b"}, {"text": "c d e"}, {"text": "f"}], tokenizer, param="r")
    batch = pack(examples)
    assert batch.boundaries == (0, len(examples[0]), len(examples[0]) + len(examples[1]), batch.n_tokens)
    owners = batch.example_index[0].tolist()
    col = 0
    while col < len(owners) and owners[col] >= 0:
        example = examples[owners[col]]
        n = len(example)
        assert owners[col : col + n] == [owners[col]] * n
        assert batch.position_ids[0, col : col + n].tolist() == list(range(n))
        assert batch.targets[0, col : col + n].tolist() == list(example.labels[1:]) + [IGNORE_INDEX]
        col += n
    assert col == batch.n_tokens
    assert batch.n_targets == sum(e.n_targets for e in examples)


def test_fused_loss_matches_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    fused = linear_cross_entropy(hidden, weight, targets, chunk=8)
    (fused * 0.5).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grad, hidden.grad)


def test_fused_loss_with_soft_capped_logits_matches_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    fused = linear_cross_entropy(hidden, weight, targets, chunk=8, softcap=2.0)
    (fused * 0.5).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(torch.tanh(hidden @ weight.T / 2.0) * 2.0, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grad, hidden.grad)
    assert not torch.allclose(fused, linear_cross_entropy(hidden, weight, targets))


def test_packed_loss_sum_matches_transformers(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=PACKED_ATTENTION)
    (example,) = tokenize_records(reverse_records(1), tokenizer, param="r")
    batch = pack([example])
    with torch.no_grad():
        ours = packed_loss_sum(model, batch) / batch.n_targets
        theirs = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_gpu_packs_with_one_kernel_per_layer_and_a_cpu_with_the_per_example_loop(monkeypatch):
    import transformers.utils as tu

    from appliance.training.packing import packed_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert packed_attention(cpu, torch.bfloat16) == PACKED_ATTENTION
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(tu, "is_torch_flex_attn_available", lambda: True)
    assert packed_attention(cuda, torch.bfloat16) == "flash_attention_2"
    assert packed_attention(cuda, torch.float32) == "flex_attention"  # flash-attn has no fp32 kernel
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: False)
    assert packed_attention(cuda, torch.bfloat16) == "flex_attention"
    monkeypatch.setattr(tu, "is_torch_flex_attn_available", lambda: False)
    assert packed_attention(cuda, torch.bfloat16) == "sdpa"


def _loss_and_grads(model_dir, attn: str, batch, device: str = "cpu", dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, local_files_only=True,
                                                 dtype=dtype, device_map={"": device})
    model.train()  # the tiny config has no dropout: training mode changes nothing but the code path
    model.get_output_embeddings().weight.requires_grad_(False)  # frozen, as under LoRA (tied: the embeddings too)
    loss = packed_loss_sum(model, batch.to(torch.device(device))) / batch.n_targets
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), grads


@pytest.mark.slow
def test_flex_attention_gives_a_packed_row_the_per_example_losses(tiny_model_dir, tokenizer):
    """The GPU's FlexAttention document mask, compiled for the CPU here (forward only: torch has no CPU backward)."""
    examples = tokenize_records(reverse_records(5, seed=3) + [{"text": "hello world " * 7}], tokenizer, param="r")
    batch = pack(examples)
    got = {}
    for attn in (PACKED_ATTENTION, "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, local_files_only=True)
        got[attn] = packed_token_losses(model, batch)
    (ours, owner), (flex, flex_owner) = got[PACKED_ATTENTION], got["flex_attention"]
    assert owner.equal(flex_owner) and len(set(owner.tolist())) == len(examples)
    torch.testing.assert_close(flex, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_the_chosen_kernel_gives_the_per_example_loss(tiny_model_dir, tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from appliance.training.packing import packed_attention

    examples = tokenize_records(reverse_records(8, seed=4), tokenizer, param="r")
    batch = pack(examples)
    kernel = packed_attention(torch.device("cuda"), torch.bfloat16)
    assert kernel != PACKED_ATTENTION
    ours, our_grads = _loss_and_grads(tiny_model_dir, PACKED_ATTENTION, batch, "cuda", torch.bfloat16)
    theirs, their_grads = _loss_and_grads(tiny_model_dir, kernel, batch, "cuda", torch.bfloat16)
    torch.testing.assert_close(theirs, ours, rtol=2e-2, atol=2e-2)
    for name in our_grads:  # bf16: loose, but a mask crossing examples would be far off
        torch.testing.assert_close(their_grads[name], our_grads[name], rtol=5e-2, atol=5e-3)
