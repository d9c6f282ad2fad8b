"""Sample-quality metrics: the maths (``stats``), the feature networks (``inception``, ``classifier``, behind
``extractors.FeatureExtractor``) and the sharded runner with its real-statistics cache (``runner``)."""
