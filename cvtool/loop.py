"""`--loop custom`: the training loop written out with tf.GradientTape.

Does what ``model.fit`` does for cvtool (one ``tf.function``-compiled step per
batch, logs named ``loss`` and ``accuracy``) and drives the very same Keras
callback objects, so precise BN, validation (``val_loss``, ``val_accuracy``:
:class:`cvtool.callbacks.ValidationScores`), checkpoints, early stopping,
history and TensorBoard behave identically in both loops. Works under a
``tf.distribute`` strategy and with a mixed-precision loss-scale optimizer.
"""

from __future__ import annotations

from cvtool.runtime import keras, tf


def custom_fit(
    model,
    train_ds,
    epochs: int,
    initial_epoch: int,
    callbacks: list,
    steps_per_epoch: int,
    label_smoothing: float = 0.0,
    strategy=None,
) -> None:
    """Train a compiled ``model`` (its optimizer is used) from ``initial_epoch`` to ``epochs``."""
    strategy = strategy or tf.distribute.get_strategy()
    optimizer = model.optimizer
    cbs = keras.callbacks.CallbackList(callbacks, model=model)
    cbs.set_params({"epochs": epochs, "steps": steps_per_epoch, "verbose": 0})
    with strategy.scope():
        loss_mean, accuracy = keras.metrics.Mean(), keras.metrics.CategoricalAccuracy()

    def per_example_loss(y, probs):
        return keras.losses.categorical_crossentropy(y, tf.cast(probs, tf.float32), label_smoothing=label_smoothing)

    def unpack(batch):
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) > 2 else tf.ones_like(y[:, 0])
        return x, y, w

    def train_replica(batch):
        x, y, w = unpack(batch)
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            losses = per_example_loss(y, probs)
            loss = tf.nn.compute_average_loss(losses * w)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        loss_mean.update_state(tf.reduce_mean(losses * w), sample_weight=tf.shape(y)[0])
        accuracy.update_state(y, probs)

    @tf.function
    def train_step(batch):
        strategy.run(train_replica, args=(batch,))

    if not optimizer.built:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    distribute = strategy.num_replicas_in_sync > 1
    train_data = strategy.experimental_distribute_dataset(train_ds) if distribute else train_ds

    model.stop_training = False
    cbs.on_train_begin()
    logs: dict = {}
    for epoch in range(initial_epoch, epochs):
        for metric in (loss_mean, accuracy):
            metric.reset_state()
        cbs.on_epoch_begin(epoch)
        for step, batch in enumerate(train_data):
            cbs.on_train_batch_begin(step)
            train_step(batch)
            cbs.on_train_batch_end(step, {"loss": float(loss_mean.result())})
        logs = {"loss": float(loss_mean.result()), "accuracy": float(accuracy.result())}
        cbs.on_epoch_end(epoch, logs)  # ValidationScores adds val_loss and val_accuracy
        if model.stop_training:
            break
    cbs.on_train_end(logs)
