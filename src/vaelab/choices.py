"""The names each choice among vaelab's settings takes, spelled once: the settings' checks (vaelab.runs.settings) and
the parts that implement the choices (vaelab.model, vaelab.data) both read them here. Plain data: importing this
imports nothing, so the settings are checked before torch is loaded."""

BINARIZE = ("none", "dynamic", "static")  # data.binarize. none: grey levels; dynamic: training images re-drawn each epoch
OBJECTIVES = ("elbo", "iwae", "notebook")  # model.objective (vaelab.model.vae)
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "discretized_logistic", "gaussian")  # model.likelihood
PRIORS = ("standard", "vamp", "mog")  # model/prior=<name> (conf/model/prior/, vaelab.model.priors)
INITS = ("default", "he")  # model.encoder.init, model.decoder.init (vaelab.model.networks)
INTERPOLATIONS = ("linear", "spherical")  # the interpolation picture's method (vaelab.model.latent.interpolate)
