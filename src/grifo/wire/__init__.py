"""OpenAI wire types shared by the gateway and the points: strict request decoding and encoders."""
