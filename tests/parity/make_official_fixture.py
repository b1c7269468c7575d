"""Writes the whole-model parity fixture from a copy of the official AST code (PyTorch).

    python tests/parity/make_official_fixture.py --official_repo=PATH/TO/AST [--out_dir=tests/parity]

PATH/TO/AST is a checkout of the official repository (BrunoSauvalle/AST; the committed fixture was
made at commit 2cf9fc6). It is imported here only; the project never ships its code, and the CI test
(tests/test_official_parity.py) needs only the two files this script writes:

* ``official_fixture.json``: per configuration, the seed, the official settings, the matching
  overrides of this project's config, and every state-dict key of the official modules with its
  shape and how `official_weights.fill` fills it (the weights themselves are not stored);
* ``official_fixture.npz``: the input images (uint8) and the official outputs.

Needs torch and transformers (any recent version; the Segformer is built from a
``transformers.SegformerConfig`` with random weights, nothing is downloaded). The official config
module asks for a CUDA device and the training script for a few packages it only uses for logging
(torchvision, pytorch_model_summary, seaborn, cv2, natsort); this script runs everything on the CPU
and stands in empty modules for those packages when they are missing.

What is recorded, for each configuration, in eval mode (BatchNorm running statistics) and in train
mode (batch statistics; the official dropout probabilities and the Segformer's drop path are set to
0 so that both codes compute the same deterministic function):

* the soft-argmax positions before the transformer, the decoded latents (xy, scale, activation
  logit, z_what), the glimpses, the placed layers and masks, the compositing weights, the
  reconstruction and the (live) background;
* the reconstruction and pixel-entropy losses and the total loss with the full entropy weight
  (a phase-3 step: optimiser step 30,001 of the official schedule);
* train mode only: the BatchNorm running statistics after the forward pass, the gradient norm of
  each top-level module, and the result of one step of the official phase-3 optimiser (a fresh
  Adam over all four networks, betas (0.9, 0.98), eps 1e-9, learning rate of step 30,001): per
  top-level module the L2 norm of the parameter change, and the new values of a few small
  parameters in full.
"""

import argparse
import importlib.util
import json
import os
import sys
import types

import numpy as np
import official_weights
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = {"unet64": 26, "segformer_b0_128": 2026}
BATCH = 2
PHASE3_STEP = 30_000  # Optimiser steps already taken when the recorded step runs.

# The two configurations: official settings, and the same model in this project's terms.
CONFIGS = {
    "unet64": {
        "official": {
            "image_height": 64,
            "image_width": 64,
            "max_set_size": 3,
            "isotropic_scaling": False,
            "feature_map_generator_name": "Unet",
            "background_complexity": False,
        },
        "config": "objects_room",
        "stride": 1,
        "overrides": {
            "model.feature_generator": "unet",
            "model.background_complexity": False,
        },
    },
    "segformer_b0_128": {
        "official": {
            "image_height": 128,
            "image_width": 128,
            "max_set_size": 10,
            "isotropic_scaling": False,
            "feature_map_generator_name": "Segformer",
            "background_complexity": False,
        },
        "config": "clevrtex",
        "stride": 2,  # Image-sized outputs: every second row and column (a smaller file).
        "overrides": {
            "model.segformer_variant": "b0",
            "model.background_complexity": False,
        },
    },
}

# Top-level modules of this project's model and the official modules they correspond to.
MODULES = {
    "feature_generator": ("E", "feature_and_attention_map_generator"),
    "embed": ("E", "feature_vector_embedding"),
    "transformer": ("E", "transformer"),
    "readout": ("E", "latents_projection"),
    "glimpse_generator": ("G", "glimpse_generator"),
    "background_logit": ("G", "background_activation_logit"),
    "background_model/encoder": ("BE", ""),
    "background_model/decoder": ("BG", ""),
}
# The layers that make the attention logits (and the feature maps), per feature generator.
ATTENTION_LAYERS = (
    "feature_and_attention_map_generator.conv1x1.weight",
    "feature_and_attention_map_generator.complete_model.decode_head.classifier.weight",
)
# Parameters whose value after the optimiser step is stored in full (small ones).
FULL_AFTER_STEP = {
    "readout/bias": ("E", "latents_projection.bias"),
    "embed/bias": ("E", "feature_vector_embedding.bias"),
    "background_logit": ("G", "background_activation_logit"),
}


def import_official(repo: str):
    """Imports the official modules with CPU settings; returns (MF_config, encoder, renderer, train,
    background models)."""
    repo = os.path.abspath(repo)
    sys.path.insert(0, repo)
    import transformers  # noqa: F401  (before any stand-in module below can confuse it)

    for name in ("torchvision", "pytorch_model_summary", "seaborn", "cv2", "natsort"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.utils = types.ModuleType(name + ".utils")
            stub.summary = None
            sys.modules[name] = stub
            sys.modules[name + ".utils"] = stub.utils
    real_device = torch.device
    torch.device = lambda *a, **k: real_device("cpu")  # MF_config asks for device 0.
    try:
        import MF_config
    finally:
        torch.device = real_device
    MF_config.args.device = real_device("cpu")
    # The frozen-weights scenario keeps MF_train from loading a background checkpoint at import.
    MF_config.args.background_model_training_scenario = "frozen_weights"
    import MF_models_encoder
    import MF_models_renderer
    import MF_train

    spec = importlib.util.spec_from_file_location(
        "official_background_models", os.path.join(repo, "background", "models.py")
    )
    background = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(background)
    return MF_config, MF_models_encoder, MF_models_renderer, MF_train, background


def build_official(official, settings: dict):
    """The official netE, netG, BE, BG for `settings`, on the CPU, in float32."""
    mf_config, encoder_mod, renderer_mod, _, background = official
    args = mf_config.args
    for key in ("image_height", "image_width", "max_set_size", "isotropic_scaling"):
        setattr(args, key, settings[key])
    args.feature_map_generator_name = settings["feature_map_generator_name"]
    from transformers import SegformerConfig, SegformerModel

    def random_b0(*_args, **_kwargs):
        # MiT-B0 sizes; no drop path so that train mode is deterministic.
        config = SegformerConfig(
            depths=[2, 2, 2, 2],
            hidden_sizes=[32, 64, 160, 256],
            decoder_hidden_size=256,
            num_attention_heads=[1, 2, 5, 8],
            drop_path_rate=0.0,
            classifier_dropout_prob=0.0,
        )
        return SegformerModel(config)

    encoder_mod.SegformerModel.from_pretrained = random_b0
    torch.manual_seed(0)
    net_e = encoder_mod.Encoder(args)
    net_g = renderer_mod.Renderer(args)
    h, w = settings["image_height"], settings["image_width"]
    complexity = settings["background_complexity"]
    be = background.Background_Encoder(h, w, complexity)
    bg = background.Background_Generator(h, w, complexity)
    # Dropout off (train mode then differs from eval mode only by the BatchNorm statistics).
    for module in net_e.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return net_e, net_g, be, bg


def fill_spec(net: torch.nn.Module) -> list:
    """[key, shape, how] for every state-dict entry of `net`, in state_dict order."""
    kinds = {}
    for name, module in net.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            kinds[f"{name}.{leaf}" if name else leaf] = module
        for leaf, _ in module.named_buffers(recurse=False):
            kinds[f"{name}.{leaf}" if name else leaf] = module
    spec = []
    for key, value in net.state_dict().items():
        shape = list(value.shape)
        module = kinds[key]
        leaf = key.rsplit(".", 1)[-1]
        if key in ("position_map", "background_mask", "background_mask_logit") or (
            leaf == "positional_encoding"
        ):
            how = ["constant"]
            want = official_weights.official_constant(key, shape)
            np.testing.assert_allclose(value.numpy(), want, atol=1e-6, err_msg=key)
        elif leaf == "num_batches_tracked":
            how = ["zeros"]
        elif leaf == "running_var":
            how = ["uniform", 0.5, 1.5]
        elif leaf == "running_mean":
            how = ["normal", 0.0, 0.1]
        elif key == "background_activation_logit":
            how = ["normal", 0.0, 0.5]
        elif key in ATTENTION_LAYERS:
            # Peaked attention, so that the K slots pool different places and features.
            fan = int(np.prod(shape[1:]))
            how = ["normal", 0.0, float(4.0 / np.sqrt(fan))]
        elif key == "latents_projection.weight":
            # Latents of about unit size: most positions inside the image, varied scales.
            how = ["normal", 0.0, float(0.7 / np.sqrt(shape[1]))]
        elif isinstance(module, torch.nn.ConvTranspose2d) and leaf == "weight":
            fan = shape[0] * shape[2] * shape[3]
            how = ["normal", 0.0, float(2.0 / np.sqrt(fan))]
        elif len(shape) >= 2:  # Conv2d, Linear, packed attention projections.
            fan = int(np.prod(shape[1:]))
            how = ["normal", 0.0, float(1.0 / np.sqrt(fan))]
        elif leaf == "weight":  # Norm scales.
            how = ["normal", 1.0, 0.1]
        else:  # Biases.
            how = ["normal", 0.0, 0.1]
        spec.append([key, shape, how])
    return spec


def load_spec(nets, specs, seed):
    """Fills the modules with the seeded numbers of `official_weights.state_dicts`."""
    fg, bg = official_weights.state_dicts(
        {"seed": seed, "foreground": specs[0], "background": specs[1]}
    )
    net_e, net_g, be, bg_net = nets
    for net, values in ((net_e, fg), (net_g, fg), (be, bg), (bg_net, bg)):
        state = {k: torch.from_numpy(values[k]) for k in net.state_dict()}
        net.load_state_dict(state)


def images_for(h: int, w: int) -> np.ndarray:
    """BATCH small synthetic scenes (uint8 NHWC): a colour gradient with a few rectangles."""
    rng = np.random.default_rng(7)
    images = np.zeros((BATCH, h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for n in range(BATCH):
        base = rng.uniform(0.2, 0.8, 3)
        images[n] = base + 0.2 * (xx[..., None] - yy[..., None]) * rng.uniform(-1, 1, 3)
        for _ in range(4):
            y0, x0 = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
            dy, dx = rng.integers(h // 10, h // 4), rng.integers(w // 10, w // 4)
            images[n, y0 : y0 + dy, x0 : x0 + dx] = rng.uniform(0, 1, 3)
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def forward(official, nets, images: torch.Tensor, settings: dict) -> dict:
    """One official forward pass with every intermediate this project's model also returns."""
    mf_config, _, _, mf_train, _ = official
    args = mf_config.args
    net_e, net_g, be, bg = nets
    k, n = args.max_set_size, images.shape[0]
    h, w = settings["image_height"], settings["image_width"]
    sd = 1 if args.isotropic_scaling else 2
    captured = {}
    hooks = [
        net_e.feature_vector_embedding.register_forward_pre_hook(
            lambda _m, inputs: captured.__setitem__("pooled", inputs[0])
        ),
        net_g.glimpse_generator.register_forward_hook(
            lambda _m, _i, output: captured.__setitem__("glimpses", output)
        ),
    ]
    real_grid_sample = torch.nn.functional.grid_sample

    def grid_sample(*a, **kw):
        out = real_grid_sample(*a, **kw)
        captured["warped"] = out
        return out

    torch.nn.functional.grid_sample = grid_sample
    try:
        rgba = (1 / 255) * bg(be(255 * images))
        latents = net_e(images)
        recon, _, _, weights = net_g(latents, rgba[:, :3])
    finally:
        torch.nn.functional.grid_sample = real_grid_sample
        for hook in hooks:
            hook.remove()
    rec, pix = mf_train.losses(recon, images, rgba, weights)
    ratio = min(1, PHASE3_STEP / args.pixel_entropy_loss_full_activation_step) ** 2
    total = rec + pix * args.pixel_entropy_loss_weight * ratio

    v = latents.permute(1, 0, 2)  # [n, k, D]
    scale = args.min_scaling_factor + (
        args.max_scaling_factor - args.min_scaling_factor
    ) * torch.sigmoid(v[..., 2 : 2 + sd])
    g = captured["glimpses"].shape[-1]
    warped = captured["warped"].reshape(k, n, 4, h, w).permute(1, 0, 3, 4, 2)
    out = {
        "xy_pooled": captured["pooled"].permute(1, 0, 2)[..., :2],
        "xy": torch.clamp(v[..., 0:2], -1, 1),
        "scale": scale.expand(n, k, 2),
        "activation_logit": v[..., 4],
        "z_what": v[..., 3 + sd :],
        "glimpses": captured["glimpses"].reshape(k, n, 4, g, g).permute(1, 0, 3, 4, 2),
        "layers": warped[..., :3],
        "masks": warped[..., 3],
        "weights": weights.reshape(k + 1, n, h, w).permute(1, 0, 2, 3),
        "reconstruction": recon.permute(0, 2, 3, 1),
        "background": rgba[:, :3].permute(0, 2, 3, 1),
    }
    out = {key: value.detach().numpy().astype(np.float32) for key, value in out.items()}
    out["loss/reconstruction"] = np.float32(rec.item())
    out["loss/pixel_entropy"] = np.float32(pix.item())
    out["loss/total"] = np.float32(total.item())
    return out, total


def module_params(nets, owner: str, prefix: str):
    net_e, net_g, be, bg = nets
    net = {"E": net_e, "G": net_g, "BE": be, "BG": bg}[owner]
    return [
        p
        for name, p in net.named_parameters()
        if p.requires_grad and (not prefix or name.split(".")[0] == prefix)
    ]


def batch_norm_stats(net_e) -> dict:
    """{official key: running statistic} of every BatchNorm of the encoder."""
    return {
        k: v.detach().numpy().astype(np.float32)
        for k, v in net_e.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }


def run_official(official, settings: dict, specs: list, seed: int, images_u8, dtype):
    """Every recorded output of one configuration, computed in `dtype` (keys without prefix)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(
        dtype
    )  # The renderer builds its affine matrices in the default dtype.
    try:
        nets = build_official(official, settings)
        load_spec(nets, specs, seed)
        nets = [net.to(dtype) for net in nets]
        images = torch.from_numpy(images_u8.astype(np.float64) / 255.0)
        images = images.permute(0, 3, 1, 2).to(dtype)
        return _run(official, nets, images, settings)
    finally:
        torch.set_default_dtype(previous)


def _run(official, nets, images, settings) -> dict:
    arrays = {}
    net_e, net_g, be, bg = nets
    for net in nets:
        net.eval()
    with torch.no_grad():
        out, _ = forward(official, nets, images, settings)
    arrays.update({f"eval/{k}": v for k, v in out.items()})

    for net in nets:
        net.train()
    mf_train = official[3]
    optimizer = torch.optim.Adam(
        [
            {"params": net_g.parameters()},
            {"params": net_e.parameters()},
            {"params": bg.parameters()},
            {"params": be.parameters()},
        ],
        lr=0.0,
        betas=(0.90, 0.98),
        eps=1e-9,
        weight_decay=0,
    )
    trainer = mf_train.Training_state()
    trainer.step = PHASE3_STEP
    for net in nets:
        net.zero_grad()
    out, total = forward(official, nets, images, settings)
    arrays.update({f"train/{k}": v for k, v in out.items()})
    arrays.update(
        {f"train/batch_stats/{k}": v for k, v in batch_norm_stats(net_e).items()}
    )
    total.backward()
    before = {}
    for module, (owner, prefix) in MODULES.items():
        params = module_params(nets, owner, prefix)
        norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
        arrays[f"train/grad_norm/{module}"] = np.float32(norm.item())
        before[module] = [p.detach().clone() for p in params]
    trainer.update(optimizer)  # Step 30,001: sets the learning rate, then Adam steps.
    optimizer.step()
    arrays["train/learning_rate"] = np.float32(trainer.rate)
    for module, (owner, prefix) in MODULES.items():
        params = module_params(nets, owner, prefix)
        change = torch.sqrt(
            sum(torch.sum((p - q) ** 2) for p, q in zip(params, before[module]))
        )
        arrays[f"train/update_norm/{module}"] = np.float32(change.item())
    state = {"E": net_e.state_dict(), "G": net_g.state_dict()}
    for path, (owner, key) in FULL_AFTER_STEP.items():
        value = state[owner][key].detach().numpy().astype(np.float32)
        arrays[f"train/after_step/{path}"] = value.reshape(-1)
    return arrays


def record(official, name: str, spec: dict):
    """The fixture entry and arrays of one configuration.

    Besides the float32 outputs it stores, per output, the official code's own float32 error: the
    largest difference between its float32 and float64 results (``noise/...``), the scale of the
    rounding differences any float32 implementation shows.
    """
    settings = spec["official"]
    nets = build_official(official, settings)
    specs = [
        fill_spec(nets[0]) + fill_spec(nets[1]),
        fill_spec(nets[2]) + fill_spec(nets[3]),
    ]
    images_u8 = images_for(settings["image_height"], settings["image_width"])
    out32 = run_official(
        official, settings, specs, SEED[name], images_u8, torch.float32
    )
    out64 = run_official(
        official, settings, specs, SEED[name], images_u8, torch.float64
    )
    arrays = {f"{name}/images": images_u8}
    for key, value in out32.items():
        field = key.rsplit("/", 1)[-1]
        value = official_weights.subsample(field, value, spec["stride"])
        arrays[f"{name}/{key}"] = value
        other = official_weights.subsample(field, out64[key], spec["stride"])
        other = np.asarray(other, np.float64)
        noise = (
            np.max(np.abs(np.asarray(value, np.float64) - other)) if other.size else 0.0
        )
        arrays[f"{name}/noise/{key}"] = np.float32(noise)
    entry = {
        "seed": SEED[name],
        "official": settings,
        "config": spec["config"],
        "overrides": spec["overrides"],
        "stride": spec["stride"],
        "foreground": specs[0],
        "background": specs[1],
    }
    return entry, arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_repo", required=True)
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument(
        "--only", default="", help="Comma-separated configuration names."
    )
    flags = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    official = import_official(flags.official_repo)
    names = [n for n in CONFIGS if not flags.only or n in flags.only.split(",")]
    fixture = {"batch": BATCH, "phase3_step": PHASE3_STEP, "configs": {}}
    arrays = {}
    json_path = os.path.join(flags.out_dir, "official_fixture.json")
    npz_path = os.path.join(flags.out_dir, "official_fixture.npz")
    if flags.only and os.path.exists(json_path):
        # Keep the other configurations of an existing fixture.
        with open(json_path) as f:
            fixture["configs"] = {
                k: v for k, v in json.load(f)["configs"].items() if k not in names
            }
        with np.load(npz_path) as data:
            arrays = {
                k: data[k] for k in data.files if k.split("/")[0] in fixture["configs"]
            }
    os.makedirs(flags.out_dir, exist_ok=True)
    for name in names:
        entry, values = record(official, name, CONFIGS[name])
        fixture["configs"][name] = entry
        arrays.update(values)
        print(f"{name}: {len(values)} arrays recorded.")
        for mode in ("eval", "train"):
            xy = values[f"{name}/{mode}/xy"]
            active = np.mean(values[f"{name}/{mode}/weights"][:, 1:] > 0.01)
            print(
                f"  {mode}: positions {np.round(xy[0], 2).tolist()}, scales "
                f"{np.round(values[f'{name}/{mode}/scale'][0, :, 0], 1).tolist()}, "
                f"slot weight > 0.01 on {active:.3f} of the slot pixels"
            )
        # Written after each configuration, so that a long run leaves what it finished.
        with open(json_path, "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
        np.savez_compressed(npz_path, **arrays)


if __name__ == "__main__":
    main()
