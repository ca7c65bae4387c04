"""Weights in and out of a run: the networks of a checkpoint (`networks`), starting weights from
other files (`init`: model.init_from) and exports (`export`: torchvision state_dict,
.safetensors with a model card, ONNX)."""
