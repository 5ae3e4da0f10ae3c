/*
 * A stand-in for Windows' bcryptprimitives.dll, for running the Windows agent under
 * Wine in tests. Wine 8.0 (Debian 12) lacks the DLL, and Rust's standard library takes
 * its random numbers from ProcessPrng there; this one exports ProcessPrng on top of
 * RtlGenRandom (SystemFunction036 in advapi32). scripts/wine-prefix builds it with
 * mingw-w64 into the test prefix's system32. Never shipped with the agent.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
