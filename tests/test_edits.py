"""The update and erase rules against the paper's formulas, written out by hand."""

import torch
from transformers import BertConfig, BertForMaskedLM

from kn_edit.apply import rules as edits
from kn_edit.model import arch


def tiny():
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    ).eval()


def test_authors_rule_matches_formula_and_touches_only_given_slots():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    emb = m.get_output_embeddings().weight.detach()
    edits.update(m, [(1, 5), (0, 3)], old_ids=7, new_ids=9, rule="authors", lambda1=1.0, lambda2=8.0)
    w_name = arch.value_param_name(m, 1)
    v = before[w_name][:, 5]  # a column of the torch Linear weight = the paper's row of W2
    e_t, e_n = emb[7], emb[9]
    want = v - 1.0 * v.norm() / e_t.norm() * e_t + 8.0 * v.norm() / e_n.norm() * e_n
    assert torch.allclose(m.state_dict()[w_name][:, 5], want, atol=1e-6)
    changed = {k for k, x in m.state_dict().items() if not torch.equal(x, before[k])}
    assert changed == {arch.value_param_name(m, 0), arch.value_param_name(m, 1)}
    for layer, idx in ((1, 5), (0, 3)):
        diff = (m.state_dict()[arch.value_param_name(m, layer)] != before[arch.value_param_name(m, layer)]).any(0)
        assert diff.nonzero().flatten().tolist() == [idx]


def test_plain_and_sign_aware_rules():
    m = tiny()
    emb = m.get_output_embeddings().weight.detach()
    v0 = arch.value_slots(m, 0)[4].detach().clone()
    v1 = arch.value_slots(m, 0)[6].detach().clone()
    edits.update(m, [(0, 4), (0, 6)], 1, 2, "plain", 2.0, 3.0, signs={(0, 4): 0.5, (0, 6): -0.1})
    assert torch.allclose(arch.value_slots(m, 0)[4], v0 - 2 * emb[1] + 3 * emb[2], atol=1e-6)
    assert torch.allclose(arch.value_slots(m, 0)[6], v1 + 2 * emb[1] - 3 * emb[2], atol=1e-6)


def test_multi_token_targets_use_the_mean_embedding():
    m = tiny()
    emb = m.get_output_embeddings().weight.detach()
    v = arch.value_slots(m, 1)[2].detach().clone()
    edits.update(m, [(1, 2)], (1, 5), (2, 3, 8), "plain", 2.0, 3.0)
    want = v - 2 * (emb[1] + emb[5]) / 2 + 3 * (emb[2] + emb[3] + emb[8]) / 3
    assert torch.allclose(arch.value_slots(m, 1)[2], want, atol=1e-6)
    one = edits.deltas(m, [(0, 1)], 7, 9, "authors", 1.0, 8.0)
    assert torch.equal(one[(0, 1)], edits.deltas(m, [(0, 1)], (7,), (9,), "authors", 1.0, 8.0)[(0, 1)])


def test_erase_sets_unk_embedding_or_zero():
    m = tiny()
    emb = m.get_output_embeddings().weight.detach()
    edits.erase(m, [(1, 2)], "unk", unk_id=3)
    assert torch.equal(arch.value_slots(m, 1)[2], emb[3])
    edits.erase(m, [(0, 1)], "zero", unk_id=None)
    assert torch.count_nonzero(arch.value_slots(m, 0)[1]) == 0
    try:
        edits.erase(m, [(0, 1)], "unk", unk_id=None)
    except ValueError as e:
        assert "no unknown token" in str(e)
    else:
        raise AssertionError("erase to [UNK] without an unknown token must fail")
