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
