"""Every configuration key of ast-seg-jax with its default and meaning.

Defaults are the official AST hyperparameters for the synthetic benchmarks (CLEVRTEX-like: 128x128, K=10,
Segformer-B3, curriculum training). Dataset configs start from `get_config()` and change what differs.

A config is locked: `--config.some.key=value` overrides only keys that exist here, so a misspelt override is
rejected with the name it did not find.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the base configuration (official AST values, CLEVRTEX-sized)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, dropout and data order.

    # ---- Data (see ast_seg_jax/input_pipeline.py) ----
    config.data = ml_collections.ConfigDict()
    # shapes | clevrtex | clevr | objects_room | shapestacks | folder
    config.data.name = "clevrtex"
    config.data.config = "full"  # Builder config (e.g. clevrtex: full / outd / camo).
    # TFDS data dir; '' means the TFDS default (~/tensorflow_datasets).
    config.data.data_dir = ""
    # Where downloaded raw files are (only needed to prepare a dataset).
    config.data.manual_dir = ""
    config.data.dir = ""  # Root of an image folder dataset (name=folder).
    # (height, width) the model sees. TFDS datasets are stored at their benchmark resolution and must
    # match it; folder images are resized to it.
    config.data.image_size = (128, 128)
    # Folder images: 'center' (crop to the aspect first) or 'none'.
    config.data.crop = "center"
    # Folder images that cannot be used (corrupt, truncated, unsupported, too large): 'skip' reports them by
    # name and leaves them out; 'error' stops. Images over max_image_side pixels on a side are unusable
    # unless large_images='downscale' (shrunk to fit when decoded).
    config.data.bad_images = "skip"
    config.data.max_image_side = 8192
    config.data.large_images = "reject"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 10_000

    # ---- Model (see ast_seg_jax/models/build.py) ----
    config.model = ml_collections.ConfigDict()
    config.model.num_slots = 10  # K, the maximum number of objects per image.
    config.model.z_what_dim = 32  # Width of each object's appearance vector.
    # One scale per object (True) or separate x/y scales.
    config.model.isotropic = False
    # The official code reads the activation logit at latent index 4, which aliases z_what[0] when
    # isotropic. True uses the clean layout (activation at index 2 + scale dims) instead.
    config.model.clean_latent_layout = False
    config.model.feature_generator = "segformer"  # segformer | unet
    config.model.segformer_variant = "b3"  # b0 .. b5
    # Run each Segformer stage's blocks as one scan: less to compile and a faster cached start, the
    # same parameters and checkpoints; slower steps on a CPU (README, "Performance").
    config.model.segformer_scan = False
    # Multiplier of the U-Net's channel widths; 1.0 is the official network (< 1 is a CPU-sized deviation).
    config.model.unet_width = 1.0
    # Local Hugging Face checkpoint dir (config.json + model.safetensors) for the MiT encoder, e.g. a
    # saved copy of nvidia/mit-b3. '' trains the encoder from random initialisation.
    config.model.pretrained_encoder = ""
    # ImageNet mean/std on the input (the official code feeds [0, 1]).
    config.model.normalize_input = False
    # True (not official; U-Net only): the feature generator reads the image and its difference from
    # the background (6 channels), so that its attention sees what the background leaves unexplained.
    config.model.residual_input = False
    # > 0 (not official): every slot's attention logits get this weight times the blurred per-pixel L1
    # distance between image and background (gradient stopped), so that the soft-argmax points start
    # where the background fails, i.e. on objects. Blur: Gaussian, standard deviation in image pixels.
    config.model.residual_attention_prior = 0.0
    config.model.residual_attention_blur = 1.5
    # False: pooled latents go straight to the renderer (ablation).
    config.model.use_transformer = True
    # True (not official): the transformer's read-out starts at zero and is added to the pooled
    # tokens, and the positions stay the soft-argmax points; False: the official read-out replaces them.
    config.model.transformer_residual = False
    # sigma > 0 (not official): non-maximum suppression between slots; in slot order, each slot's
    # attention logits lose strength * exp(-d^2 / (2 sigma^2)) at distance d (grid units, [-1, 1])
    # from every earlier slot's soft-argmax point. 0: off, as in the official code.
    config.model.slot_suppression_sigma = 0.0
    config.model.slot_suppression_strength = 1000.0
    # Where z_what comes from: 'pooled' (official) reads it from the attention-pooled token;
    # 'crop' (not official) encodes it from each slot's window of the input image with a small CNN
    # (ast_seg_jax/models/crop_encoder.py), as SPAIR and SPACE encode their objects.
    config.model.appearance_encoder = "pooled"
    config.model.crop_encoder_width = (
        32  # Channels of the crop encoder's first convolutions.
    )
    config.model.transformer_layers = 6
    config.model.transformer_dim = 256
    config.model.transformer_heads = 8
    config.model.transformer_mlp_dim = 512
    config.model.transformer_dropout = 0.1
    # Inverse scale of the largest object (it spans 1/1.3 of the image).
    config.model.min_scale = 1.3
    config.model.max_scale = 24.0  # Inverse scale of the smallest object.
    config.model.background_logit_init = 11.0  # log(alpha_0) at initialisation.
    # Multiplies the initial weights of the K attention-logit channels of the feature generator's last
    # layer (1.0: official). > 1 gives peaked, image-dependent attention at the start of a random-init run.
    config.model.attention_init_scale = 1.0
    config.model.background_complexity = True  # Wider AE-NE channel schedule.
    # Multiplier of the AE-NE hidden widths; 1.0 is the official network (< 1 is a CPU-sized deviation).
    config.model.background_width = 1.0
    # True (not official): the background autoencoder's colours are shifted per image and channel so that
    # their median is the image's median; the network draws the backdrop's shape, the image gives its colour.
    config.model.background_median_shift = False
    config.model.glimpse_size = 0  # 0: 32 for images <= 64, 64 for <= 128, 128 above.
    # Multiplier of the glimpse generator's hidden channels (1.0: official).
    config.model.glimpse_width = 1.0
    # Where the glimpse's mask comes from: 'decoded' (official) is the glimpse generator's; 'window'
    # (not official) is drawn by a small CNN from the window of the image and of the background that
    # the glimpse covers (ast_seg_jax/models/window_mask.py).
    config.model.glimpse_mask = "decoded"
    config.model.window_mask_width = 32  # Hidden channels of that CNN.
    # True (not official): each glimpse is painted in one colour, the mean of its decoded colours.
    config.model.flat_colour = False
    # Two rules of the segmentation (evaluation, probe, `experiments.segment`, figures), not official;
    # 0 turns each off (the official argmax of the compositing weights): a slot whose weight stays
    # below segment_min_peak_weight at every pixel takes no pixel, and a pixel that several layers
    # draw with a weight of at least segment_colour_min_weight goes to the one whose colour is
    # closest to the image (ast_seg_jax/models/compositing.py).
    config.model.segment_min_peak_weight = 0.0
    config.model.segment_colour_min_weight = 0.0
    # Computation dtype of the feature generator, glimpse generator and background networks:
    # float32 (official), or bfloat16 for mixed precision (parameters, optimiser, transformer,
    # soft-argmax, compositing and losses stay float32). See the README's benchmark section.
    config.model.compute_dtype = "float32"

    # ---- Curriculum (see ast_seg_jax/curriculum.py) ----
    # curriculum: (1) pretrain background, (2) foreground on the frozen background, (3) fine-tune both.
    # baseline: no pretraining, both trained from scratch from step 0 (the paper's BT).
    # frozen_background: phase 2 for the whole run (Table 4 ablation).
    config.scenario = "curriculum"

    # ---- Phase 1: background pretraining ----
    config.background = ml_collections.ConfigDict()
    config.background.num_train_steps = 500_000
    config.background.batch_size = 128
    config.background.learning_rate = 2e-3
    # Linear ramp of the AE-NE weight sharpness beta from 0 to 6 over this many steps; 0 = the
    # official loss from the first step (see curriculum.background_loss_beta).
    config.background.robust_warmup_steps = 0
    # lr x 0.1 from this fraction of the steps on.
    config.background.decay_fraction = 0.8
    # Linear learning-rate warm-up over this many steps; 0 = the official constant rate.
    config.background.warmup_steps = 0
    # Directory of a background checkpoint from another run (its WORKDIR/background); used instead of
    # phase 1 when set.
    config.background.restore_from = ""
    # Phase 2 background source: True computes every training image's background once after phase 1 and
    # stores it as uint8 (the official method); False runs the frozen network at every step.
    config.background.precompute = True

    # ---- Phases 2 and 3: foreground training ----
    config.num_train_steps = 125_000  # Phases 2 + 3 together.
    config.freeze_background_steps = 30_000  # Length of phase 2.
    config.batch_size = 64
    config.learning_rate = 4e-5
    config.warmup_steps = 5_000  # Quadratic learning-rate warm-up.
    config.decay_fraction = 0.9  # lr x 0.1 from this fraction of the steps on.
    config.adam_b1 = 0.9
    config.adam_b2 = 0.98
    config.adam_eps = 1e-9
    # The official code builds a fresh Adam over foreground + background at the phase 2 -> 3 switch.
    config.reset_optimizer_at_phase3 = True
    config.pixel_entropy_weight = 1e-2
    config.pixel_entropy_warmup_steps = 10_000
    # Object-entropy loss (squared entropy of each image's mean layer weights), from the official
    # code's first version (weight 3e-4, quadratic warm-up over 5,000 steps); version 2 dropped it: 0.
    config.object_entropy_weight = 0.0
    config.object_entropy_warmup_steps = 5_000
    # With model.glimpse_mask='window' (not official): weight of the binary cross-entropy that trains
    # the glimpse generator's decoded mask towards the window mask, so that z_what keeps the
    # object's shape. 0: off.
    config.mask_distillation_weight = 0.0
    # Not official: weight of `losses.slot_overlap_loss` (pixels that two slots would each cover if drawn
    # alone), ramped up like the object entropy over object_entropy_warmup_steps. 0: off.
    config.slot_overlap_weight = 0.0

    # ---- Logging, evaluation, checkpoints ----
    config.log_loss_every_steps = 100
    config.log_images_every_steps = 5_000
    config.checkpoint_every_steps = 2_000
    config.max_checkpoints_to_keep = 2
    # Debugging exact resumption: append the example ids (`index`) of every training step to
    # WORKDIR/example_ids.txt (phases 2-3) and WORKDIR/example_ids_background.txt (phase 1).
    config.record_example_ids = False
    config.eval_batch_size = 64
    # Images of the eval split for the shape probe (datasets that store each object's kind, e.g.
    # the built-in shapes; see ast_seg_jax/probe.py); 0 turns it off.
    config.num_probe_images = 512
    config.num_eval_images = (
        -1
    )  # Images of the eval split scored at the end; -1 means all.
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """Applies a config-file argument (`--config=path.py:ARG`).

    ARG is a comma-separated list of words: `tiny` shrinks every size and step count to a few seconds of
    CPU work (smoke tests; the numbers mean nothing). An empty ARG changes nothing.
    """
    for word in filter(None, (w.strip() for w in (arg or "").split(","))):
        if word == "tiny":
            shrink_for_smoke_test(config)
        else:
            raise ValueError(f"Unknown config argument {word!r}; known: tiny.")
    return config


def shrink_for_smoke_test(config: ml_collections.ConfigDict) -> None:
    """Tiny model, batch and step counts, keeping every code path (all three phases) alive."""
    config.model.segformer_variant = "b0"
    config.model.transformer_layers = 1
    config.model.transformer_dim = 32
    config.model.transformer_heads = 2
    config.model.transformer_mlp_dim = 64
    config.model.background_complexity = False
    config.background.num_train_steps = 2
    config.background.batch_size = 4
    config.num_train_steps = 4
    config.freeze_background_steps = 2
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_eval_images = 6
    config.num_probe_images = 16
    config.warmup_steps = 2
    config.pixel_entropy_warmup_steps = 2
    config.log_loss_every_steps = 1
    config.log_images_every_steps = 4
    config.checkpoint_every_steps = 2
    config.data.shuffle_buffer = 16
