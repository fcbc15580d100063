"""vizkit.graph.ModelGraph on real tiny Keras models: one trace per model, outputs made by
keras.ops, layers called more than once, class logits, and layer-name errors.

Expected values are computed directly (NumPy on the layers' own weights, or the layers
called on concrete tensors), never through ModelGraph.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_nested, build_tiny

from vizkit.graph import SCORES, LayerError, ModelGraph
from vizkit.technique import suggest

L = keras.layers


def batch(count: int = 3, size: int = 16, seed: int = 0) -> np.ndarray:
    """Seeded float32 images centred on 0 (so ReLU and scaling change them)."""
    return np.random.default_rng(seed).normal(0, 1, (count, size, size, 3)).astype("float32")


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def node_counts(layers) -> list[int]:
    # Keras has no public accessor for a layer's calls (Layer.output shows only the first);
    # _inbound_nodes is the list each symbolic call appends to.
    return [len(layer._inbound_nodes) for layer in layers]


def all_layers(model) -> list:
    """Every layer of ``model``, those of nested models included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(all_layers(layer))
    return found


def flatten_classifier(size: int = 16) -> keras.Model:
    """Conv → Flatten → Dense: its free-size graph stops at Flatten."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((size, size, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="head")(x), name="flat")


@pytest.fixture
def nested():
    return build_nested()


# -- 1. one trace per model ----------------------------------------------------------


@pytest.mark.parametrize("build", [build_tiny, build_nested, flatten_classifier])
def test_a_model_is_traced_once_however_often_its_graph_is_asked_for(build):
    model = build()
    layers = all_layers(model)
    x = batch(2, size=model.inputs[0].shape[1])

    def use(graph):
        graph.free_size()
        graph.free_size().probe([graph.free_size().layers[0].path])(x)
        graph.probe([info.path for info in graph.layers])(x)
        graph.class_scores(x)
        graph.class_scores(x, score="logit")
        graph.probe([graph.layers[0].path], score="logit")(x)
        graph.predict(x)

    graph = ModelGraph.of(model)
    use(graph)
    after_first = node_counts(layers)
    for _ in range(4):
        assert ModelGraph(model) is graph
        assert ModelGraph.of(model) is graph
        assert ModelGraph.of(graph) is graph and ModelGraph(graph) is graph
        assert graph.free_size() is graph.free_size()
        use(ModelGraph(model))
        use(ModelGraph.of(model))
    assert node_counts(layers) == after_first
    # Each layer was called at most once more by each of the two traces (fixed and free size)
    # and, in a nested model, once more when Keras rebuilt it on intermediate tensors.
    before = [1] * len(layers)
    assert all(a - b <= 4 for a, b in zip(after_first, before))


def test_free_size_graph_accepts_other_sizes_and_matches_the_fixed_one(nested):
    graph = ModelGraph.of(nested)
    free = graph.free_size()
    assert free.fixed_size is None and graph.fixed_size == (32, 32)
    x = batch(1, size=32)
    np.testing.assert_allclose(
        numpy(free.probe(["base/base_conv2"])(x)), numpy(graph.probe(["base/base_conv2"])(x)), atol=1e-6
    )
    assert free.probe(["base/base_conv2"])(batch(1, size=20)).shape == (1, 20, 20, 8)


# -- 2. an output made by keras.ops ----------------------------------------------------


def test_output_made_by_keras_ops_is_traced():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.ops.softmax(L.Dense(4, name="dense")(x))
    model = keras.Model(inputs, outputs)
    assert any(not isinstance(op, keras.Layer) for op in model.operations)  # really an op

    graph = ModelGraph.of(model)
    x = batch()
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)
    np.testing.assert_allclose(graph.predict(x), numpy(model(x)), atol=1e-6)
    last = [info for info in graph.layers if info.feeds_output][-1]
    assert last.kind == "Softmax" and last.shape == (4,)
    assert graph.info("dense").feeds_output and graph.is_classifier and graph.num_classes == 4


def test_op_in_the_middle_and_in_a_nested_model():
    keras.utils.set_random_seed(6)
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, keras.ops.sigmoid(L.Dense(1, name="logit")(inner_in) * 2.0), name="inner")
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = keras.ops.mean(keras.ops.abs(x), axis=(1, 2))  # ops between layers
    model = keras.Model(inputs, inner(x))
    graph = ModelGraph.of(model)
    x = batch()
    p = numpy(model(x))
    np.testing.assert_allclose(graph.class_scores(x), np.concatenate([1 - p, p], axis=1), atol=1e-6)
    assert graph.output_activation == "sigmoid"
    features = np.abs(numpy(graph.probe(["conv"])(x))).mean(axis=(1, 2))
    dense = model.get_layer("inner").get_layer("logit")
    z = 2.0 * (features @ numpy(dense.kernel) + numpy(dense.bias))
    np.testing.assert_allclose(graph.class_scores(x, "logit"), np.concatenate([-z, z], axis=1), atol=1e-5)


# -- 3. a layer or a nested model called more than once --------------------------------


def test_shared_convolution_is_addressed_once_per_call():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((16, 16, 3))
    conv = L.Conv2D(3, 3, padding="same", name="conv")
    a = conv(inputs)
    b = conv(L.Activation("relu", name="relu")(inputs))  # a parallel branch, same weights
    c = conv(L.Add(name="add")([a, b]))  # a third call, fed by the other two
    outputs = L.Dense(2, activation="softmax", name="head")(L.GlobalAveragePooling2D(name="gap")(c))
    model = keras.Model(inputs, outputs)

    graph = ModelGraph.of(model)
    assert [info.path for info in graph.layers if info.kind == "Conv2D"] == ["conv", "conv#2", "conv#3"]
    assert all(graph.info(path).feeds_output for path in ("conv", "conv#2", "conv#3"))
    assert graph.resolve("conv#2") == "conv#2"

    x = batch()
    direct_a = numpy(conv(x))
    direct_b = numpy(conv(keras.ops.relu(x)))
    direct_c = numpy(conv(direct_a + direct_b))
    first, second, third = (numpy(t) for t in graph.probe(["conv", "conv#2", "conv#3"])(x))
    # The third call depends on the other two, so it is numbered last; the two parallel
    # calls are numbered in Keras's execution order: each one is one of the direct results.
    np.testing.assert_allclose(third, direct_c, atol=1e-5)
    matches = sorted(
        (i, j) for i, got in enumerate((first, second)) for j, want in enumerate((direct_a, direct_b))
        if np.allclose(got, want, atol=1e-5)
    )
    assert matches in ([(0, 0), (1, 1)], [(0, 1), (1, 0)]), matches
    assert not np.allclose(direct_a, direct_b, atol=1e-3)  # the test can tell them apart
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)


def test_feeds_output_follows_each_call_to_the_explained_head():
    keras.utils.set_random_seed(10)
    inputs = keras.Input((16, 16, 3))
    conv = L.Conv2D(3, 3, padding="same", name="conv")
    trunk = conv(inputs)
    classes = L.Dense(3, activation="softmax", name="classes")(L.GlobalAveragePooling2D(name="gap")(trunk))
    other = L.Conv2D(2, 1, name="segmentation")(conv(L.Activation("relu", name="relu")(inputs)))
    graph = ModelGraph.of(keras.Model(inputs, [classes, other]))

    assert graph.output_shape == (3,)  # the first head is the one explained
    feeding = {info.path for info in graph.layers if info.feeds_output}
    assert {"gap", "classes"} <= feeding
    assert not {"segmentation", "relu"} & feeding
    (call,) = {"conv", "conv#2"} & feeding  # one call of the shared layer feeds the classes
    x = batch()
    np.testing.assert_allclose(numpy(graph.probe([call])(x)), numpy(conv(x)), atol=1e-5)


def test_shared_convolution_called_in_sequence():
    keras.utils.set_random_seed(8)
    inputs = keras.Input((16, 16, 3))
    conv = L.Conv2D(3, 3, padding="same", name="conv")
    x = conv(conv(inputs))
    model = keras.Model(inputs, L.GlobalAveragePooling2D(name="gap")(x))
    graph = ModelGraph.of(model)
    x = batch()
    np.testing.assert_allclose(numpy(graph.probe(["conv#2"])(x)), numpy(conv(conv(x))), atol=1e-5)
    np.testing.assert_allclose(numpy(graph.probe(["conv"])(x)), numpy(conv(x)), atol=1e-5)


def test_shared_nested_model_is_addressed_once_per_call():
    keras.utils.set_random_seed(9)
    base_in = keras.Input((16, 16, 3))
    y = L.Conv2D(3, 3, padding="same", name="conv1")(base_in)
    base = keras.Model(base_in, L.Conv2D(3, 1, name="conv2")(y), name="base")
    inputs = keras.Input((16, 16, 3))
    twice = base(L.Rescaling(0.5, name="half")(base(inputs)))
    outputs = L.Dense(3, activation="softmax", name="head")(L.GlobalAveragePooling2D(name="gap")(twice))
    model = keras.Model(inputs, outputs, name="siamese")

    graph = ModelGraph.of(model)
    paths = [info.path for info in graph.layers]
    for path in ("base/conv1", "base/conv2", "base", "base#2/conv1", "base#2/conv2", "base#2"):
        assert path in paths
        assert graph.info(path).feeds_output
    assert graph.info("base#2").nested_model and not graph.info("base#2/conv1").nested_model

    x = batch()
    once = numpy(base(x))
    conv1 = base.get_layer("conv1")
    np.testing.assert_allclose(numpy(graph.probe(["base/conv1"])(x)), numpy(conv1(x)), atol=1e-5)
    np.testing.assert_allclose(numpy(graph.probe(["base#2/conv1"])(x)), numpy(conv1(0.5 * once)), atol=1e-5)
    np.testing.assert_allclose(numpy(graph.probe(["base#2"])(x)), numpy(base(0.5 * once)), atol=1e-5)
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)

    with pytest.raises(LayerError) as caught:
        graph.resolve("conv1")  # two calls: which one?
    assert "base/conv1" in str(caught.value) and "base#2/conv1" in str(caught.value)


# -- 4. class logits -------------------------------------------------------------------


def features_and_head(ending: str, classes: int):
    """Layers before the head, and the head's output from its input, per kind of ending."""
    dense_activation = "softmax" if ending == "dense" else ("sigmoid" if ending == "dense_sigmoid" else None)
    dense = L.Dense(classes, activation=dense_activation, name="logits")

    def head(x):
        z = dense(x)
        if ending == "softmax_layer":
            return L.Softmax(name="softmax_layer")(z)
        if ending == "activation":
            return L.Activation("softmax", name="activation_softmax")(z)
        if ending == "ops":
            return keras.ops.softmax(z)
        if ending == "activation_sigmoid":
            return L.Activation("sigmoid", name="activation_sigmoid")(z)
        if ending == "ops_sigmoid":
            return keras.ops.sigmoid(z)
        return z  # "dense", "dense_sigmoid", "linear"

    return dense, head


def classifier(ending: str, where: str, classes: int = 4):
    """conv → relu → global average pool → a head ending as ``ending``.

    ``where``: "top" (all in one Functional model), "nested" (the head is an inner
    model), or "sequential".
    """
    keras.utils.set_random_seed(11)
    dense, head = features_and_head(ending, classes)
    if where == "sequential":
        assert ending in ("dense", "softmax_layer", "activation", "dense_sigmoid", "linear")
        layers = [
            keras.Input((16, 16, 3)),
            L.Conv2D(6, 3, activation="relu", name="conv"),
            L.GlobalAveragePooling2D(name="gap"),
            dense,
        ]
        extra = {"softmax_layer": L.Softmax(), "activation": L.Activation("softmax")}.get(ending)
        return keras.Sequential(layers + ([extra] if extra else []), name="seq"), dense
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    if where == "nested":
        head_in = keras.Input((6,))
        x = keras.Model(head_in, head(head_in), name="classifier")(x)
    else:
        x = head(x)
    return keras.Model(inputs, x, name=f"{ending}_{where}"), dense


SOFTMAX_ENDINGS = [
    (ending, where)
    for ending in ("dense", "softmax_layer", "activation", "ops")
    for where in ("top", "nested")
] + [("dense", "sequential"), ("softmax_layer", "sequential"), ("activation", "sequential")]


@pytest.mark.parametrize("ending,where", SOFTMAX_ENDINGS)
def test_softmax_endings_expose_the_logits(ending, where):
    model, dense = classifier(ending, where)
    graph = ModelGraph.of(model)
    assert graph.output_activation == "softmax" and graph.has_logits

    x = batch()
    probabilities = graph.class_scores(x)
    logits = graph.class_scores(x, score="logit")
    np.testing.assert_allclose(probabilities, numpy(model(x)), atol=1e-6)
    np.testing.assert_allclose(softmax(logits), probabilities, atol=1e-6)
    # the logits themselves: the head's Dense on the pooled features, with its own weights
    gap = numpy(graph.probe(["gap"])(x))
    np.testing.assert_allclose(logits, gap @ numpy(dense.kernel) + numpy(dense.bias), atol=1e-5)
    assert not np.allclose(logits, probabilities, atol=1e-2)
    assert graph.scores_model("logit").output.shape[1:] == (4,)


@pytest.mark.parametrize("ending", ["dense_sigmoid", "activation_sigmoid", "ops_sigmoid"])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_single_sigmoid_unit_logits_are_each_class_log_odds(ending, where):
    model, dense = classifier(ending, where, classes=1)
    graph = ModelGraph.of(model)
    assert graph.output_activation == "sigmoid" and graph.has_logits and graph.num_classes == 2

    x = batch(4)
    p = numpy(model(x))[:, 0]
    z = (numpy(graph.probe(["gap"])(x)) @ numpy(dense.kernel) + numpy(dense.bias))[:, 0]
    np.testing.assert_allclose(graph.class_scores(x), np.stack([1 - p, p], axis=1), atol=1e-6)
    logits = graph.class_scores(x, "logit")
    np.testing.assert_allclose(logits, np.stack([-z, z], axis=1), atol=1e-5)
    np.testing.assert_allclose(sigmoid(logits[:, 1]), p, atol=1e-6)
    np.testing.assert_allclose(sigmoid(logits[:, 0]), 1 - p, atol=1e-6)


def test_sequential_single_sigmoid_unit():
    model, dense = classifier("dense_sigmoid", "sequential", classes=1)
    graph = ModelGraph.of(model)
    x = batch()
    z = graph.class_scores(x, "logit")[:, 1]
    np.testing.assert_allclose(sigmoid(z), numpy(model(x))[:, 0], atol=1e-6)


def test_dense_without_activation_outputs_logits():
    model, dense = classifier("linear", "top", classes=3)
    graph = ModelGraph.of(model)
    assert graph.output_activation == "linear" and graph.has_logits
    x = batch()
    out = numpy(model(x))
    np.testing.assert_allclose(graph.class_scores(x, "logit"), out, atol=1e-6)
    np.testing.assert_allclose(graph.class_scores(x, "probability"), softmax(out), atol=1e-6)
    np.testing.assert_allclose(graph.predict(x), out, atol=1e-6)  # predict stays the raw output

    # one linear unit is a regression (issue 13), not a binary classifier's logit: no class scores
    single, _ = classifier("linear", "nested", classes=1)
    graph = ModelGraph.of(single)
    assert graph.is_regression and not graph.is_classifier and not graph.has_logits
    assert graph.output_kind.startswith("regression (one linear unit)")
    with pytest.raises(ValueError, match="is a regression"):
        graph.class_scores(x, "logit")


def test_unknown_ending_has_no_logits_and_keeps_its_output_as_scores():
    keras.utils.set_random_seed(12)
    inputs = keras.Input((16, 16, 3))
    x = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, L.Activation("relu", name="relu_out")(L.Dense(3, name="dense")(x)))
    graph = ModelGraph.of(model)
    assert graph.output_activation is None and not graph.has_logits
    x = batch()
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)
    with pytest.raises(ValueError, match="logits") as caught:
        graph.scores_model("logit")
    assert "relu_out" in str(caught.value)
    with pytest.raises(ValueError, match="score must be one of"):
        graph.class_scores(x, score="logits")


def test_not_a_classifier_has_no_scores():
    keras.utils.set_random_seed(13)
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, L.Conv2D(2, 3, activation="softmax", name="seg")(inputs))
    graph = ModelGraph.of(model)
    assert not graph.has_logits
    with pytest.raises(ValueError, match="not a classifier"):
        graph.scores_model("probability")


def test_logit_scores_come_with_features_in_one_differentiable_call():
    model, dense = classifier("dense", "nested", classes=4)
    graph = ModelGraph.of(model)
    kernel = numpy(dense.kernel)
    x = tf.constant(batch(2))

    gradients = {}
    for score in SCORES:
        probe = graph.probe(["gap"], score=score)
        with tf.GradientTape() as tape:
            features, scores = probe(x, training=False)
            tape.watch(features)  # an intermediate output: watched, gradients flow from it
            target = scores[:, 1]
        np.testing.assert_allclose(numpy(scores), graph.class_scores(x, score), atol=1e-6)
        gradients[score] = numpy(tape.gradient(target, features))

    # d logit_1 / d features = the Dense kernel's column 1, for every image
    np.testing.assert_allclose(gradients["logit"], np.tile(kernel[:, 1], (2, 1)), atol=1e-5)
    # d p_1 / d features = p_1 (W_1 - sum_k p_k W_k)
    p = graph.class_scores(x)
    expected = p[:, 1:2] * (kernel[:, 1][None] - p @ kernel.T)
    np.testing.assert_allclose(gradients["probability"], expected, atol=1e-5)
    assert not np.allclose(gradients["logit"], gradients["probability"], atol=1e-3)

    # with_output keeps returning the raw output when no score is asked for
    features, raw = graph.probe(["gap"], with_output=True)(x)
    np.testing.assert_allclose(numpy(raw), numpy(model(x)), atol=1e-6)


def test_logits_read_the_layer_weights_as_they_are_now():
    model, dense = classifier("dense", "top", classes=4)
    graph = ModelGraph.of(model)
    x = batch()
    graph.class_scores(x, "logit")  # the score model exists before the weights change
    dense.kernel.assign(numpy(dense.kernel) * 3.0)
    dense.bias.assign(np.arange(4, dtype="float32"))
    gap = numpy(graph.probe(["gap"])(x))
    np.testing.assert_allclose(graph.class_scores(x, "logit"), gap @ numpy(dense.kernel) + np.arange(4), atol=1e-5)
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)


# -- 5. layer-name errors --------------------------------------------------------------


def many_layers(count: int = 30) -> keras.Model:
    keras.utils.set_random_seed(14)
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i in range(count):
        x = L.Conv2D(3, 1, name=f"conv_{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(2, activation="softmax", name="head")(x), name="deep")


def test_error_lists_the_nearest_valid_layers_and_how_many_more():
    graph = ModelGraph.of(many_layers(30))
    spatial = lambda info: info.spatial  # noqa: E731
    valid = [info.path for info in graph.layers if info.spatial]
    assert len(valid) == 30

    with pytest.raises(LayerError) as caught:
        graph.resolve("conv_17x", spatial, "gradcam")
    message = str(caught.value)
    assert message.startswith("deep has no layer 'conv_17x'; valid layers: ")
    listed, more = message.split("valid layers: ", 1)[1].split(", … and ")
    assert listed.split(", ") == suggest("conv_17x", valid).split(", ")[:5]
    assert listed.split(", ")[0] == "conv_17"
    assert more == "25 more (see `vizkit layers MODEL`)"


@pytest.mark.parametrize(
    "purpose,reason,expected",
    [
        ("gradcampp", "", "layer 'head' cannot be used for gradcampp; "),
        ("gradcam", "it has no H×W×C output", "layer 'head' cannot be used for gradcam (it has no H×W×C output); "),
        (  # the older form, " for TECHNIQUE (reason)"
            " for activations (it has no H×W×C output)",
            "",
            "layer 'head' cannot be used for activations (it has no H×W×C output); ",
        ),
        ("", "", "layer 'head' cannot be used here; "),
    ],
)
def test_error_for_a_layer_that_cannot_be_used(purpose, reason, expected):
    graph = ModelGraph.of(many_layers(3))
    with pytest.raises(LayerError) as caught:
        graph.resolve("head", lambda info: info.spatial, purpose, reason=reason)
    message = str(caught.value)
    assert message.startswith(expected)
    listed = message.split("valid layers: ", 1)[1].split(", ")
    assert listed == suggest("head", ["conv_0", "conv_1", "conv_2"]).split(", ")  # all 3, no "more"


def test_resolve_accepts_full_paths_and_unique_names():
    graph = ModelGraph.of(build_nested())
    assert graph.resolve("base_conv1") == "base/base_conv1"
    assert graph.resolve("base/base_conv1") == "base/base_conv1"
    with pytest.raises(LayerError, match="outer has no layer 'nope'; valid layers: "):
        graph.resolve("nope")


def test_tiny_model_layers_and_scores_unchanged():
    model = build_tiny()
    graph = ModelGraph.of(model)
    assert [info.path for info in graph.layers] == ["conv1", "pool1", "conv2", "gap", "predictions"]
    assert all(info.feeds_output for info in graph.layers)
    x = batch(2, size=32)
    np.testing.assert_allclose(graph.class_scores(x), numpy(model(x)), atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # Keras says so too
def test_softmax_over_a_single_unit_has_no_logits():
    keras.utils.set_random_seed(15)
    inputs = keras.Input((16, 16, 3))
    x = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, L.Dense(1, activation="softmax", name="head")(x))  # always 1.0
    graph = ModelGraph.of(model)
    assert graph.output_activation is None and not graph.has_logits
    np.testing.assert_allclose(graph.class_scores(batch()), [[0.0, 1.0]] * 3)
