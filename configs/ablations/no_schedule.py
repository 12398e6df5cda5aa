# "w/o noise schedule" (Table 1): the plain cosine training schedule instead of the inverted one (§3.4).
schedule = "cosine"
