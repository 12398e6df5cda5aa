# "Novel views" on a base that auto-encodes (the teaching config's z-usage recipe, views='identical'):
# source and target are two augmentations of one image again, as in the paper (§3.3, §4.1). Under
# configs/ablations/paper.py the base already has them and no_novel_views.py is the ablation instead.
views = "augment"
