"""The shared import helpers: a part built from its config takes the checkpoint's tensors as its parameters without
a copy, a tied head tied again to the checkpoint's embedding, nothing left on the meta device."""

import torch
from tiny import text_config
from transformers import AutoModelForCausalLM

from leanvlm.interop.checkpoints import load_part


def test_a_tied_causal_lm_takes_the_checkpoints_tensors_and_ties_its_head_to_them():
    config = text_config("llama3")  # tied word embeddings: checkpoints hold no lm_head
    state = {k: v.to(torch.bfloat16) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
             if k != "lm_head.weight"}
    model = load_part(config.to_dict(), state, causal_lm=True, what="language model", dtype=torch.bfloat16)
    parameters = dict(model.named_parameters())
    assert all(parameters[k].data_ptr() == v.data_ptr() for k, v in state.items())  # no copy
    assert model.lm_head.weight is model.get_input_embeddings().weight
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    assert [name for name, tensor in tensors.items() if tensor.is_meta] == []
