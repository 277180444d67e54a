"""Preprocessing of one example (TF graph functions), as in the original ViT and BiT releases.

Following google-research/vision_transformer `vit_jax/input_pipeline.py` and big_transfer
`bit_pytorch/train.py`:

* eval: bilinear resize of the whole image to `[image_size, image_size]` (aspect ratio not
  kept, no crop, no antialiasing; `tf.image.resize` with half-pixel centres), then
  `x / 127.5 - 1` into [-1, 1]. `crop_fraction=c` instead resizes the shorter side to
  `round(image_size / c)` (aspect kept) and takes the central `image_size` square, the
  Inception / big_vision recipe (c = 0.875 gives 256 -> 224).
* train: Inception-style random resized crop (`sample_distorted_bounding_box` with area
  5%-100%, aspect ratio 3/4-4/3, no minimum object coverage), bilinear resize to
  `image_size`, random horizontal flip (optional), `x / 127.5 - 1`. All randomness is
  stateless, keyed by (seed, epoch, example index), so a batch does not depend on when or
  where it is computed.
"""

import tensorflow as tf

# Inception crop area range and aspect-ratio range of the original ViT training code.
TRAIN_AREA_RANGE = (0.05, 1.0)
TRAIN_ASPECT_RANGE = (3 / 4, 4 / 3)


def _to_model_range(image: tf.Tensor) -> tf.Tensor:
  return image / 127.5 - 1.0


def _eval_preprocess(image: tf.Tensor, image_size: int,
                     crop_fraction: float | None) -> tf.Tensor:
  """uint8 `[h, w, 3]` -> float32 `[image_size, image_size, 3]` in [-1, 1]."""
  if crop_fraction is None:
    return _to_model_range(tf.image.resize(image, [image_size, image_size]))
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  target = tf.constant(round(image_size / crop_fraction), tf.float64)
  new_shape = tf.cast(tf.round(shape * target / tf.reduce_min(shape)), tf.int32)
  image = tf.image.resize(image, new_shape)
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  return _to_model_range(tf.ensure_shape(image, [image_size, image_size, 3]))


def _train_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor,
                      area_range: tuple[float, float], random_flip: bool = True) -> tf.Tensor:
  """uint8 `[h, w, 3]` -> random resized crop + flip, float32 `[size, size, 3]` in [-1, 1].

  `seed` is the example's int64 pair (epoch seed, example index); the crop and the flip use
  the distinct stateless keys (epoch seed, 2 * index) and (epoch seed, 2 * index + 1). Without
  `random_flip` (data that mirroring changes, such as digits) no image is flipped.
  """
  crop_seed = seed * tf.constant([1, 2], tf.int64)
  flip_seed = crop_seed + tf.constant([0, 1], tf.int64)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=crop_seed,
      area_range=area_range, aspect_ratio_range=TRAIN_ASPECT_RANGE, min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [image_size, image_size])
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _to_model_range(image)


def _check_image_size(image_size: int) -> None:
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}.")
