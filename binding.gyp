{
  "targets": [
    {
      "target_name": "drivetap_native",
      "sources": ["native/drivetap_native.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
