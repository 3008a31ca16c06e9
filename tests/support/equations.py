"""The named models' equations as plain torch loops, for checking compiled code.

Each generative reference walks t = 1..T in the order of the model's equations
and calls `latent(t, features)` for z[t] and `observe(t, features)` for x[t];
the callbacks score a given value or draw a new one and return it. Each guide
reference does the same for the combiner's features of q(z[t] | ...). The
functions use a compiled model's sub-networks (its GRUs' weights, transition,
emission and combiner) but none of its methods, so they check the generated
wiring, not repeat it. Steps count from 0 here, so the step "before 1" is the
learned initial value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def initial(parameter: torch.Tensor, batch: int) -> torch.Tensor:
    return parameter.expand(batch, parameter.shape[-1])


def gru_step(recurrent, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One GRU step written out from the weights of recurrent.rnn (PyTorch's gate layout)."""
    rnn = recurrent.rnn
    reset_x, update_x, new_x = F.linear(inputs, rnn.weight_ih_l0, rnn.bias_ih_l0).chunk(3, -1)
    reset_h, update_h, new_h = F.linear(state, rnn.weight_hh_l0, rnn.bias_hh_l0).chunk(3, -1)
    reset = torch.sigmoid(reset_x + reset_h)
    update = torch.sigmoid(update_x + update_h)
    candidate = torch.tanh(new_x + reset * new_h)
    return (1 - update) * candidate + update * state


def normal_log_density(value, loc, scale):
    """log N(value; loc, diag(scale^2)), summed over the last dimension."""
    return (-0.5 * ((value - loc) / scale) ** 2 - torch.log(scale)
            - 0.5 * math.log(2 * math.pi)).sum(-1)


def bernoulli_log_mass(value, logits):
    """log Bernoulli(value; sigmoid(logits)), summed over the last dimension."""
    return (value * logits - F.softplus(logits)).sum(-1)


def gaussian_kl(loc_q, scale_q, loc_p, scale_p):
    """KL(N(loc_q, scale_q^2) || N(loc_p, scale_p^2)), summed over the last dimension."""
    return (torch.log(scale_p / scale_q)
            + (scale_q ** 2 + (loc_q - loc_p) ** 2) / (2 * scale_p ** 2) - 0.5).sum(-1)


# --- generative models, one equation per line ---------------------------------

def dmm(m, batch, steps, latent, observe):
    z = initial(m.z_0, batch)
    for t in range(steps):
        z = latent(t, z)                                  # z[t] ~ p(z | z[t-1])
        observe(t, z)                                     # x[t] ~ p(x | z[t])


def rssm(m, batch, steps, latent, observe):
    h = initial(m.h.h_0, batch)
    for t in range(steps):
        z = latent(t, h)                                  # z[t] ~ p(z | h[t-1])
        h = gru_step(m.h, z, h)                           # h[t] = gru(z[t], h[t-1])
        observe(t, h)                                     # x[t] ~ p(x | h[t])


def ar_hmm(m, batch, steps, latent, observe):
    z, x = initial(m.z_0, batch), initial(m.x_0, batch)
    for t in range(steps):
        z = latent(t, z)                                  # z[t] ~ p(z | z[t-1])
        x = observe(t, torch.cat([z, x], -1))             # x[t] ~ p(x | z[t], x[t-1])


def arssm(m, batch, steps, latent, observe):
    h1, h2 = initial(m.h1.h_0, batch), initial(m.h2.h_0, batch)
    for t in range(steps):
        z = latent(t, h1)                                 # z[t] ~ p(z | h1[t-1])
        h1 = gru_step(m.h1, z, h1)                        # h1[t] = gru(z[t], h1[t-1])
        x = observe(t, torch.cat([h1, h2], -1))           # x[t] ~ p(x | h1[t], h2[t-1])
        h2 = gru_step(m.h2, x, h2)                        # h2[t] = gru(x[t], h2[t-1])


def f_hmm(m, batch, steps, latent, observe):
    z, x = initial(m.z_0, batch), initial(m.x_0, batch)
    for t in range(steps):
        z = latent(t, torch.cat([z, x], -1))              # z[t] ~ p(z | z[t-1], x[t-1])
        x = observe(t, z)                                 # x[t] ~ p(x | z[t])


def fssm(m, batch, steps, latent, observe):
    h1, h2 = initial(m.h1.h_0, batch), initial(m.h2.h_0, batch)
    for t in range(steps):
        z = latent(t, torch.cat([h1, h2], -1))            # z[t] ~ p(z | h1[t-1], h2[t-1])
        h1 = gru_step(m.h1, z, h1)                        # h1[t] = gru(z[t], h1[t-1])
        x = observe(t, h1)                                # x[t] ~ p(x | h1[t])
        h2 = gru_step(m.h2, x, h2)                        # h2[t] = gru(x[t], h2[t-1])


def dmm_aug(m, batch, steps, latent, observe):
    z, x = initial(m.z_0, batch), initial(m.x_0, batch)
    for t in range(steps):
        z_next = latent(t, torch.cat([z, x], -1))         # z[t] ~ p(z | z[t-1], x[t-1])
        x = observe(t, torch.cat([z_next, x], -1))        # x[t] ~ p(x | z[t], x[t-1])
        z = z_next


def srnn(m, batch, steps, latent, observe):
    z, x, d = initial(m.z_0, batch), initial(m.x_0, batch), initial(m.d.h_0, batch)
    for t in range(steps):
        d = gru_step(m.d, x, d)                           # d[t] = gru(x[t-1], d[t-1])
        z = latent(t, torch.cat([z, d], -1))              # z[t] ~ p(z | z[t-1], d[t])
        x = observe(t, torch.cat([z, d], -1))             # x[t] ~ p(x | z[t], d[t])


def vrnn(m, batch, steps, latent, observe):
    x, h = initial(m.x_0, batch), initial(m.h.h_0, batch)
    for t in range(steps):
        z = latent(t, torch.cat([x, h], -1))              # z[t] ~ p(z | x[t-1], h[t-1])
        h = gru_step(m.h, torch.cat([x, z], -1), h)       # h[t] = gru([x[t-1], z[t]], h[t-1])
        x = observe(t, h)                                 # x[t] ~ p(x | h[t])


# --- guides: the combiner's features besides the inference RNN ---------------

def partial_guide(m, x, latent):
    """q(z[t] | z[t-1], ...) for every model."""
    z = initial(m.z_0, x.shape[0])
    for t in range(x.shape[1]):
        z = latent(t, [z])


def full_z_only(m, x, latent):
    """DMM: p(z[t] | z[1:t-1], x[1:T]) = p(z[t] | z[t-1], x[t:T])."""
    partial_guide(m, x, latent)


def full_z_and_previous_x(m, x, latent):
    """AR-HMM, F-HMM, DMM-Aug: x[t-1] is a co-parent of z[t]'s children, or z[t]'s parent."""
    z, x_previous = initial(m.z_0, x.shape[0]), initial(m.x_0, x.shape[0])
    for t in range(x.shape[1]):
        z = latent(t, [z, x_previous])
        x_previous = x[:, t]


def full_rssm(m, x, latent):
    h = initial(m.h.h_0, x.shape[0])
    for t in range(x.shape[1]):
        z = latent(t, [h])                                # h[t-1] carries z[1:t-1]
        h = gru_step(m.h, z, h)


def full_two_states(m, x, latent):
    """ArSSM and FSSM: h1[t-1] carries z[1:t-1] and h2[t-1] carries x[1:t-1]."""
    h1, h2 = initial(m.h1.h_0, x.shape[0]), initial(m.h2.h_0, x.shape[0])
    for t in range(x.shape[1]):
        z = latent(t, [h1, h2])
        h1 = gru_step(m.h1, z, h1)
        h2 = gru_step(m.h2, x[:, t], h2)


def full_srnn(m, x, latent):
    z, x_previous, d = (initial(m.z_0, x.shape[0]), initial(m.x_0, x.shape[0]),
                        initial(m.d.h_0, x.shape[0]))
    for t in range(x.shape[1]):
        d = gru_step(m.d, x_previous, d)                  # d[t] carries x[1:t-1]
        z = latent(t, [z, d])
        x_previous = x[:, t]


def full_vrnn(m, x, latent):
    x_previous, h = initial(m.x_0, x.shape[0]), initial(m.h.h_0, x.shape[0])
    for t in range(x.shape[1]):
        z = latent(t, [h])                                # h[t-1] carries z[1:t-1], x[1:t-2]
        h = gru_step(m.h, torch.cat([x_previous, z], -1), h)
        x_previous = x[:, t]


def inference_summaries(inference_rnn, x, lengths, bidirectional):
    """The inference RNN's outputs, (batch, time, width) each, computed per sequence.

    The backward RNN at t has read x[L], x[L-1], ..., x[t] of a sequence of
    length L; the forward one x[1], ..., x[t]. Padded steps stay zero.
    """
    batch, steps, _ = x.shape
    width = inference_rnn.backward_rnn.h_0.shape[-1]
    backward = x.new_zeros(batch, steps, width)
    forward = x.new_zeros(batch, steps, width)
    for b in range(batch):
        length = int(lengths[b])
        state = inference_rnn.backward_rnn.h_0[None]
        for t in reversed(range(length)):
            state = gru_step(inference_rnn.backward_rnn, x[b:b + 1, t], state)
            backward[b, t] = state[0]
        if bidirectional:
            state = inference_rnn.forward_rnn.h_0[None]
            for t in range(length):
                state = gru_step(inference_rnn.forward_rnn, x[b:b + 1, t], state)
                forward[b, t] = state[0]
    return [backward, forward] if bidirectional else [backward]


# --- scoring and sampling with the references --------------------------------

def masked_sum(per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_step, torch.zeros_like(per_step)).sum(-1)


def log_joint(reference, m, z, x, mask):
    """log p(z) and log p(x | z) per sequence for a Bernoulli model, summed over real steps."""
    latent_terms, observed_terms = [], []

    def latent(t, features):
        loc, scale = m.transition(features)
        latent_terms.append(normal_log_density(z[:, t], loc, scale))
        return z[:, t]

    def observe(t, features):
        observed_terms.append(bernoulli_log_mass(x[:, t], m.emission.net(features)))
        return x[:, t]

    reference(m, x.shape[0], x.shape[1], latent, observe)
    return (masked_sum(torch.stack(latent_terms, 1), mask),
            masked_sum(torch.stack(observed_terms, 1), mask))


def transition_params(reference, m, z, x):
    """Loc and scale of p(z[t] | ...) at every step, (batch, time, z_dim) each."""
    locs, scales = [], []

    def latent(t, features):
        loc, scale = m.transition(features)
        locs.append(loc)
        scales.append(scale)
        return z[:, t]

    reference(m, x.shape[0], x.shape[1], latent, lambda t, features: x[:, t])
    return torch.stack(locs, 1), torch.stack(scales, 1)


def emission_means(reference, m, z, x):
    """The mean of p(x[t] | ...) at every step along z, with x teacher-forced (Bernoulli)."""
    means = []

    def observe(t, features):
        means.append(torch.sigmoid(m.emission.net(features)))
        return x[:, t]

    reference(m, x.shape[0], x.shape[1], lambda t, features: z[:, t], observe)
    return torch.stack(means, 1)


def sample_prior(reference, m, batch, steps):
    """Draw (z, x) in equation order with the same torch draws as a step-by-step sampler."""
    from pyro import distributions as dist

    zs, xs = [], []

    def latent(t, features):
        zs.append(dist.Normal(*m.transition(features)).rsample())
        return zs[-1]

    def observe(t, features):
        xs.append(dist.Bernoulli(logits=m.emission.net(features)).sample())
        return xs[-1]

    reference(m, batch, steps, latent, observe)
    return torch.stack(zs, 1), torch.stack(xs, 1)


def guide_params(guide_reference, m, x, lengths, bidirectional, z=None):
    """Loc and scale of every q(z[t] | ...) along z, or along the mean path when z is None."""
    summaries = inference_summaries(m.inference_rnn, x, lengths, bidirectional)
    locs, scales = [], []

    def latent(t, features):
        loc, scale = m.combiner(features, [summary[:, t] for summary in summaries])
        locs.append(loc)
        scales.append(scale)
        return loc if z is None else z[:, t]

    guide_reference(m, x, latent)
    return torch.stack(locs, 1), torch.stack(scales, 1)
