{
  "targets": [
    {
      "target_name": "drivetap_native",
      "sources": ["native/drivetap_native.c", "native/loop_poll.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
