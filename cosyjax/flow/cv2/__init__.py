"""CosyVoice2 flow: upsampling Conformer encoder + causal U-Net CFM estimator (`model.flow_inference`)."""
