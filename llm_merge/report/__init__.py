"""What a merge writes about itself: merge_config.json and the model card."""
