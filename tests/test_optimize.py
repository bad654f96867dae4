import numpy as np
import pytest
import torch

import fluxlab
from fluxlab.optimize import describe


def test_channels_last_vae_decodes_the_same_image(tiny, tiny_pipe):
    reference = np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16)
    done = fluxlab.optimize(tiny_pipe, channels_last_vae=True)
    assert done == {"channels_last_vae": True}
    assert tiny_pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    image = np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16)
    assert np.abs(image - reference).max() <= 1
    assert describe(done) == "channels-last VAE"
    with pytest.raises(ValueError, match="channels_last_vae was already applied"):
        fluxlab.optimize(tiny_pipe, channels_last_vae=True)
