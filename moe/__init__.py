"""moe-a2a model side: routing, experts, the EP MoE layer, parallel context, CLI."""
