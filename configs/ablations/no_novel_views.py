# "w/o novel views" (Table 1): auto-encoding, the source view is the target view (§4.1).
views = "identical"
