#include "transport/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstdlib>
#include <cstdio>

#include "base/coding.h"

namespace replica::transport {

std::string RandomNonce() {
  std::string nonce(kNonceSize, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()), static_cast<int>(nonce.size())) != 1) {
    // Without randomness the handshake is worthless; refuse to go on.
    std::fprintf(stderr, "fatal: RAND_bytes failed\n");
    std::abort();
  }
  return nonce;
}

std::string AuthProof(std::string_view secret, std::string_view role, std::string_view cluster,
                      std::string_view client_nonce, std::string_view server_nonce) {
  std::string msg;
  for (std::string_view part : {role, cluster, client_nonce, server_nonce}) {
    PutFixed32(&msg, static_cast<uint32_t>(part.size()));
    msg.append(part);
  }
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}

bool ProofEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace replica::transport
