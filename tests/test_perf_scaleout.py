"""Scale-out placement of the hidden teacher (docs/benchmarks.md, "Scale-out").

FSDP places only the parameters it sees (registered submodules, moved with `param.data = ...`;
Lightning's FSDP strategy never calls `.to()`), so the teacher, kept out of registration, would
stay on the CPU while the batches reach the GPU. The teacher follows its input's device instead.
No GPU here: the "meta" device stands in for the accelerator (shapes only, no data)."""

import torch

from toolkit.distill import Teacher
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.types import Batch


def _module(teacher: Teacher | None = None) -> DistillationModule:
    torch.manual_seed(0)
    student = create_model("convnet", num_classes=10, in_chans=1, width=4)
    teacher = teacher or Teacher(create_model("convnet", num_classes=10, in_chans=1, width=8))
    return DistillationModule(student, teacher, num_classes=10)


def _devices(net: torch.nn.Module) -> set[str]:
    return {p.device.type for p in net.parameters()} | {b.device.type for b in net.buffers()}


def test_teacher_follows_the_input_when_only_registered_parameters_were_moved():
    module = _module()
    teacher_net = module.teacher.nets[0]
    module.model.to("meta")  # what FSDP does: the registered modules only
    assert _devices(module.model) == {"meta"} and _devices(teacher_net) == {"cpu"}
    x = torch.randn(4, 1, 28, 28, device="meta")
    out = module.teacher_output(Batch(x, None, None))
    assert out.logits.device.type == "meta" and out.logits.shape == (4, 10)
    assert _devices(teacher_net) == {"meta"}  # moved once, whole (parameters and BN buffers)
    assert not teacher_net.training and not any(p.requires_grad for p in teacher_net.parameters())
    # still hidden: never in the module's parameters (optimiser, DDP/FSDP) nor in its state_dict
    assert not {id(p) for p in teacher_net.parameters()} & {id(p) for p in module.parameters()}
    assert not any(k.startswith("teacher.") for k in module.state_dict())


def test_the_device_after_the_input_transform_decides_where_the_teacher_runs():
    net = create_model("convnet", num_classes=10, in_chans=1, width=4)
    teacher = Teacher(net, input_transform=lambda x: x.to("meta"))
    out = teacher(torch.randn(3, 1, 28, 28))  # a CPU batch, sent elsewhere by the transform
    assert out.logits.device.type == "meta" and _devices(net) == {"meta"}


def test_same_device_is_a_no_op_and_gives_the_same_outputs():
    module = _module()
    x = torch.randn(5, 1, 28, 28)
    before = [p.data_ptr() for p in module.teacher.nets[0].parameters()]
    a = module.teacher_output(Batch(x, None, None)).logits
    b = module.teacher.nets[0](x)
    torch.testing.assert_close(a, b)
    assert [p.data_ptr() for p in module.teacher.nets[0].parameters()] == before  # nothing copied
