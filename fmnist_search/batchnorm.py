"""FusedBatchNormalization: Keras' BatchNormalization computed by TensorFlow's fused kernel.

Keras 3 builds BatchNorm out of separate operations and, under the mixed bfloat16 policy
(precision.py), first casts each feature map to float32: every BatchNorm layer reads and
writes several float32 maps, which training may keep for the backward pass. TensorFlow's
fused kernel (`FusedBatchNormV3`, oneDNN's on this CPU) reads the bfloat16 map itself and
accumulates its statistics in float32; only bfloat16 maps take it. The layer keeps Keras'
variables, config and rule for when to use the moving statistics, so a trained model is
exported with the built-in layer in its place (`precision.as_float32`) and loads without
the tool. Measured: docs/benchmarks.md, "BatchNorm in one fused op".
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="fmnist_search")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that normalises bfloat16 NHWC feature maps with TensorFlow's fused
    kernel, in training and inference: the same outputs and gradients as Keras' to bfloat16
    precision, the same moving statistics to float32 round-off. Other inputs (float32, or dense
    features) take Keras' own code."""

    # The built-in layer a model carries when it leaves the tool (precision.as_float32):
    # the same variables and config, so the copy needs no custom objects to load.
    portable_class = keras.layers.BatchNormalization

    def _fusable(self, inputs: Any) -> bool:
        return bool(
            keras.backend.backend() == "tensorflow"
            # Under float32 Keras' code stays: there TensorFlow's graph optimiser merged
            # the fused op with a tanh after it into a kernel that lacks that merge (a
            # trial failed: "Fusion is not implemented: [FusedBatchNorm,Tanh]"); float32
            # was measured once, with a prototype, and its pool peaked higher
            # (docs/benchmarks.md).
            and self.compute_dtype == "bfloat16"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.center
            and self.scale
            and not self.renorm
        )

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None or not self._fusable(inputs):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        gamma, beta = tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32")
        if not (training and self.trainable):  # Keras' rule: the moving statistics
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta,
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon, data_format="NHWC", is_training=False,
            )
            return tf.cast(outputs, self.compute_dtype)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        # The kernel returns the batch variance with Bessel's correction, n / (n - 1);
        # Keras' moving variance averages the uncorrected one, so undo it.
        n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
        variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum)
        )
        return tf.cast(outputs, self.compute_dtype)
