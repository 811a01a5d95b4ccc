"""Code shared by Aerie's services: typed settings, model store, gRPC plumbing, logging."""
