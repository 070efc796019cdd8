"""U-Net: shapes on odd sizes, gradients, checkpointing, BatchNorm folding, determinism, the matmul upsampling."""

import io

import pytest
import torch
import torch.nn.functional as F

from network.unet import UNet, UpConv2x2, fold_batchnorm


def _model(seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(**kwargs)


@pytest.mark.parametrize("features", [(4, 8), [4, 8, 16, 32], (4,)])
@pytest.mark.parametrize("size", [(17, 23), (37, 53), (32, 32)])
def test_output_shape_on_odd_sizes(features, size):
    model = _model(features=features, out_channels=5)
    logits = model(torch.randn(2, 1, *size))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 5, *size)


def test_one_pixel_input_in_eval_mode():
    model = _model(features=(4, 8)).eval()  # train-mode BatchNorm needs > 1 value per channel
    with torch.no_grad():
        assert model(torch.randn(1, 1, 1, 1)).shape == (1, 12, 1, 1)


def test_neighbouring_slices_as_channels():
    model = _model(in_channels=3, features=(4, 8), out_channels=12)
    assert model(torch.randn(2, 3, 19, 21)).shape == (2, 12, 19, 21)


def test_bad_inputs_raise():
    model = _model(features=(4, 8))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="B, C, H, W"):
        model(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="features"):
        UNet(features=())


@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_upsampling_equals_the_transposed_conv(channels_last):
    torch.manual_seed(0)
    up = UpConv2x2(6, 5).double()
    reference = torch.nn.ConvTranspose2d(6, 5, kernel_size=2, stride=2).double()
    reference.load_state_dict(up.state_dict())  # same parameters: old checkpoints load
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y, y_reference = up(x), reference(x)
    assert y.shape == (3, 5, 14, 10)
    torch.testing.assert_close(y, y_reference, rtol=0, atol=1e-12)
    with torch.no_grad():  # inference takes the transposed-conv kernel
        torch.testing.assert_close(up(x), y_reference, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), [x, up.weight, up.bias])
    grads_reference = torch.autograd.grad(y_reference.square().sum(), [x, reference.weight, reference.bias])
    for grad, grad_reference in zip(grads, grads_reference):
        torch.testing.assert_close(grad, grad_reference, rtol=0, atol=1e-12)


def test_gradients_are_finite_and_reach_every_parameter():
    model = _model(features=(4, 8), out_channels=3)
    model(torch.randn(2, 1, 17, 23)).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_checkpointing_gives_same_outputs_gradients_and_batchnorm_statistics():
    x = torch.randn(2, 1, 19, 21)
    results = []
    for checkpointing in (False, True):
        model = _model(features=(4, 8, 16), out_channels=3, checkpointing=checkpointing).train()
        logits = model(x)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        stats = [b.clone() for b in model.buffers()]
        results.append((logits.detach(), grads, stats))
    (out_a, grads_a, stats_a), (out_b, grads_b, stats_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(stats_a, stats_b):  # the recompute must not update running stats twice
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fold_batchnorm_matches_eval_mode():
    model = _model(features=(4, 8, 16), out_channels=5)
    model.train()
    with torch.no_grad():  # a few train-mode passes so running stats are not the defaults
        for _ in range(3):
            model(torch.randn(4, 1, 24, 24) * 3 + 1)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(2, 1, 27, 31)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-4)


def _double_conv_params(c_in: int, c_out: int) -> int:
    # two bias-free 3x3 convs, each followed by BatchNorm (weight + bias)
    return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out


def test_default_model_size():
    model = UNet()
    assert model.downs[-1][1][0].out_channels == 1024  # bottleneck
    widths = [64, 128, 256, 512, 1024]
    encoder = _double_conv_params(1, 64) + sum(
        _double_conv_params(a, b) for a, b in zip(widths[:-1], widths[1:]))
    decoder = sum(4 * a * b + b + _double_conv_params(2 * b, b)  # 2x2 transposed conv with bias
                  for a, b in zip(widths[:0:-1], widths[-2::-1]))
    head = 64 * 12 + 12
    expected = encoder + decoder + head
    assert expected == 31_037_196
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.slow
def test_overfits_one_batch():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 2:8, 3:10] = 1
    target[:, 9:14, 6:15] = 2
    image = image + target[:, None].float()  # the target is visible in the image
    model = _model(features=(8, 16), out_channels=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_same_seed_same_output():
    x = torch.randn(2, 1, 20, 20)
    out_a = _model(seed=3, features=(4, 8))(x)
    out_b = _model(seed=3, features=(4, 8))(x)
    assert torch.equal(out_a, out_b)


def test_state_dict_round_trip():
    model = _model(features=(4, 8), out_channels=4)
    with torch.no_grad():
        model(torch.randn(3, 1, 16, 16))  # update running stats so they matter
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = _model(seed=99, features=(4, 8), out_channels=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    restored.eval()
    x = torch.randn(2, 1, 18, 22)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
